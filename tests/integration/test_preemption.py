"""Preemption in the text engine (tiny model, float64: a resume must not change a
single token) and through the whole stack (real API, worker and redis-server)."""

import json
import threading
import time

import httpx
import pytest
import torch

from broker.messages import GenerateRequest, SamplingParams, TokenEvent
from gpu_worker.text.engine import TextEngine
from inferstack.registry import Modality, ModelSpec
from scheduler.queue import Claimed
from scheduler.settings import SchedulerSettings
from tests.integration.test_engine import reference_greedy
from tests.stack import Stack
from tests.tiny import registry_toml


@pytest.fixture(scope="module")
def engine_factory(tiny_model_dir):
    def make(**kw):
        spec = ModelSpec(name="tiny", modality=Modality.TEXT, path=str(tiny_model_dir))
        return TextEngine(spec, tiny_model_dir, device=torch.device("cpu"), dtype=torch.float64, **kw)
    return make


def prompt(seed: int, n: int = 70) -> list[int]:
    return torch.randint(3, 390, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greq(rid, user, tokens, max_tokens, tier="normal"):
    return GenerateRequest(id=rid, model="tiny", prompt_token_ids=tokens, reply_to="x", user=user, tier=tier,
                           params=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


class Collector:
    def __init__(self):
        self.events: dict[str, list[TokenEvent]] = {}
        self.done: set[str] = set()
        self.requeued: list[tuple[str, str, str]] = []

    def __call__(self, batch):
        for o in batch:
            if o.requeue:
                self.requeued.append((o.request_id, o.requeue, o.reason))
            elif isinstance(o.event, TokenEvent):
                self.events.setdefault(o.request_id, []).append(o.event)
            if o.request_done:
                self.done.add(o.request_id)

    def tokens(self, rid):
        return [t for e in self.events.get(rid, []) for t in e.token_ids]


def steps_until(engine, emit, cond, limit=400):
    for _ in range(limit):
        if cond():
            return
        engine.step(emit)
    raise AssertionError("engine never got there")


@pytest.mark.parametrize("resume_on", ["same", "other"])
def test_a_preempted_sequence_resumes_with_identical_tokens(engine_factory, resume_on):
    """A newcomer takes a running request's row; the victim's KV waits in DRAM; it
    resumes from its output log on the same engine (restoring the copy) or on another
    one (recomputing prompt + tokens sent), and its tokens equal an uninterrupted run."""
    engine = engine_factory(max_seqs=2, max_prefill_tokens=64, kv_dram_bytes=64 << 20)
    a1, a2 = greq("a1", "a", prompt(1), 30), greq("a2", "a", prompt(2), 30)
    b = greq("b", "b", prompt(3, 20), 6)
    out = Collector()
    engine.add(Claimed(a1, 1), [])
    engine.add(Claimed(a2, 1), [])
    steps_until(engine, out, lambda: len(out.tokens("a1")) >= 8)
    view = {r.rid: r for r in engine.batch_view().running}
    assert view["a1"].steps >= 4 and view["a1"].work == 70 + len(out.tokens("a1")) - 1
    assert engine.capacity() == 0
    engine.add(Claimed(b, 1, victims=("a1",), reason="share"), [])
    assert [r.rid for r in engine.batch_view().running] == ["a2", "b"]  # the pending claim counts already
    engine.step(out)
    assert out.requeued == [("a1", "preempted", "share")]
    assert out.events["b"][0].start == 0  # b got a1's row at once
    sent = list(out.events["a1"])
    steps_until(engine, out, lambda: "b" in out.done)
    target = engine if resume_on == "same" else engine_factory(max_seqs=2, kv_dram_bytes=64 << 20)
    restores = target.kv_store.stats.restores
    target.add(Claimed(a1, 2, preemptions=1), sent)  # the claimer reads the log for attempt > 1
    steps_until(target, out, lambda: "a1" in out.done)
    resumed = out.events["a1"][len(sent):]
    assert resumed[0].start == len(out.tokens("a1")) - sum(len(e.token_ids) for e in resumed)
    model = engine.runner.model
    assert out.tokens("a1") == reference_greedy(model, a1.prompt_token_ids, 30)
    assert out.tokens("b") == reference_greedy(model, b.prompt_token_ids, 6)
    if resume_on == "same":
        assert target.kv_store.stats.restores == restores + 1  # from DRAM, not recomputed
        assert not [k for k in target.kv_store.entries if k.startswith("preempted:")]  # used up
    else:
        assert target.kv_store.stats.restores == restores
    steps_until(engine, out, lambda: "a2" in out.done)
    assert out.tokens("a2") == reference_greedy(model, a2.prompt_token_ids, 30)


def test_a_victim_that_finished_meanwhile_just_frees_its_row(engine_factory):
    engine = engine_factory(max_seqs=1)
    a, b = greq("a", "a", [5, 6, 7], 3), greq("b", "b", [8, 9], 3)
    out = Collector()
    engine.add(Claimed(a, 1), [])
    steps_until(engine, out, lambda: "a" in out.done)
    engine.add(Claimed(b, 1, victims=("a",), reason="tier"), [])
    steps_until(engine, out, lambda: "b" in out.done)
    assert out.requeued == []
    assert out.tokens("b") == reference_greedy(engine.runner.model, b.prompt_token_ids, 3)
