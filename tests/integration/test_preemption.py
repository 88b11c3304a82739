"""Preemption in the text engine (tiny model, float64: a resume must not change a
single token) and through the whole stack (real API, worker and redis-server)."""

import functools
import json
import re
import threading
import time

import httpx
import pytest
import torch

from broker.messages import Claimed, GenerateRequest, SamplingParams, TokenEvent
from scheduler.queue import FairQueue
from scheduler.settings import SchedulerSettings
from tests.integration.test_engine import reference_greedy
from tests.stack import Stack
from tests.tiny import registry_toml


def prompt(seed: int, n: int = 70) -> list[int]:
    return torch.randint(3, 390, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greq(rid, user, tokens, max_tokens, tier="normal", seed=None):
    """Greedy, or seeded sampling (as reproducible, and the tiny model's greedy output
    tends to repeat one token)."""
    sampling = dict(temperature=0.0) if seed is None else dict(temperature=1.0, seed=seed)
    return GenerateRequest(id=rid, model="tiny", prompt_token_ids=tokens, reply_to="x", user=user, tier=tier,
                           params=SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling))


def uninterrupted(engine, req):
    """The request's tokens when it runs alone, start to end."""
    out = Collector()
    engine.add(Claimed(req, 1), [])
    steps_until(engine, out, lambda: req.id in out.done)
    return out.tokens(req.id)


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


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))


@pytest.mark.parametrize("seed", [None, 7], ids=["greedy", "seeded"])
@pytest.mark.parametrize("resume_on", ["same", "other"])
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_a_preempted_sequence_resumes_with_identical_tokens(engine_factory, device, resume_on, seed):
    """A newcomer takes a running request's row; the victim's KV waits in DRAM; it
    resumes from its output log on the same engine (restoring the copy) or on another
    one (recomputing prompt + tokens sent), and its tokens equal an uninterrupted run.
    On CUDA the DRAM copy is pinned host memory, filled and read back asynchronously."""
    engine_factory = functools.partial(engine_factory, device)
    engine = engine_factory(max_seqs=2, max_prefill_tokens=64, kv_dram_bytes=64 << 20)
    a1, a2 = greq("a1", "a", prompt(1), 30, seed=seed), greq("a2", "a", prompt(2), 30, seed=seed)
    b = greq("b", "b", prompt(3, 20), 6, seed=seed)
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
    saved = engine.kv_store.entries["preempted:a1:0"].layers
    assert all(t.device.type == "cpu" and t.is_pinned() == (device == "cuda") for kv in saved for t in kv)
    sent = list(out.events["a1"])
    steps_until(engine, out, lambda: "b" in out.done)
    target = engine if resume_on == "same" else engine_factory(max_seqs=2, kv_dram_bytes=64 << 20)
    restores = target.kv_store.stats.restores
    target.add(Claimed(a1, 2, preemptions=1), sent)  # the claimer reads the log for attempt > 1
    steps_until(target, out, lambda: "a1" in out.done)
    resumed = out.events["a1"][len(sent):]
    assert resumed[0].start == len(out.tokens("a1")) - sum(len(e.token_ids) for e in resumed)
    reference = engine_factory(max_seqs=1)
    assert out.tokens("a1") == uninterrupted(reference, a1)
    assert out.tokens("b") == uninterrupted(reference, b)
    if resume_on == "same":
        assert target.kv_store.stats.restores == restores + 1  # from DRAM, not recomputed
        assert not [k for k in target.kv_store.entries if k.startswith("preempted:")]  # used up
    else:
        assert target.kv_store.stats.restores == restores
    steps_until(engine, out, lambda: "a2" in out.done)
    assert out.tokens("a2") == uninterrupted(reference, a2)
    if seed is None:  # and greedy is greedy
        assert out.tokens("a1") == reference_greedy(reference.runner.model, a1.prompt_token_ids, 30)


def test_a_short_victim_is_restored_from_dram_not_recomputed(engine_factory):
    """A victim far shorter than a prefix block (12 prompt tokens + 5 sent) still keeps
    its KV: resuming it here prefills one token, not its whole history again."""
    engine = engine_factory(max_seqs=1, kv_dram_bytes=64 << 20)
    a, b = greq("a", "a", prompt(1, 12), 12), greq("b", "b", prompt(2, 8), 3)
    out = Collector()
    engine.add(Claimed(a, 1), [])
    steps_until(engine, out, lambda: len(out.tokens("a")) >= 5)
    engine.add(Claimed(b, 1, victims=("a",), reason="share"), [])
    engine.step(out)
    assert out.requeued == [("a", "preempted", "share")]
    computed = engine.kv_store.entries["preempted:a:0"].token_ids
    assert computed == a.prompt_token_ids + out.tokens("a")[:len(computed) - 12]
    steps_until(engine, out, lambda: "b" in out.done)
    sent = list(out.events["a"])
    restores = engine.kv_store.stats.restores
    engine.add(Claimed(a, 2, preemptions=1), sent)
    engine.step(out)  # the resume step: one token of prefill on top of the restored KV
    assert engine.kv_store.stats.restores == restores + 1
    assert not [k for k in engine.kv_store.entries if k.startswith("preempted:")]  # used up
    steps_until(engine, out, lambda: "a" in out.done)
    assert out.tokens("a") == uninterrupted(engine_factory(max_seqs=1), a)


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


# -- through the stack: API, worker, redis-server, metrics -------------------------------


def body(tokens, max_tokens, user, **extra):
    # Seeded sampling: as reproducible as greedy (draws depend on seed, choice and
    # position only), and the tiny model's greedy output is one token repeated.
    return {"model": "tiny", "prompt": tokens, "max_tokens": max_tokens, "temperature": 1.0, "seed": tokens[0],
            "ignore_eos": True, "skip_special_tokens": False, "user": user, **extra}


def stream_completion(url, tokens, max_tokens, user, out: list):
    """Streams a greedy completion, appending each text piece to ``out`` as it comes."""
    with httpx.stream("POST", f"{url}/v1/completions", timeout=120,
                      json=body(tokens, max_tokens, user, stream=True)) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                if chunk["choices"]:
                    out.append(chunk["choices"][0]["text"])


def completion_text(url, tokens, max_tokens, user):
    r = httpx.post(f"{url}/v1/completions", timeout=120, json=body(tokens, max_tokens, user))
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.fixture
def preempt_stack(redis_url, tiny_model_dir, tmp_path):
    registry = registry_toml(tmp_path / "models.toml", tiny_model_dir, max_batch=2)
    sched = SchedulerSettings(redis_url=redis_url, lease_s=3, preempt_min_run_steps=2)
    s = Stack(redis_url, registry, tmp_path / "cache", sched=sched, workers=0,
              worker_kw={"dtype": "float64"})  # exact: a resumed stream must match token for token
    yield s
    s.stop()


def wait_for(cond, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what() if callable(what) else what}"
        time.sleep(0.01)


def flood_then_newcomer(stack, newcomer_tokens: int, third_of_a: bool = False):
    """User a fills both rows with long streams (and, with ``third_of_a``, queues one
    more); user b arrives. Returns a's outputs, b's text and how far a's streams were
    when b's answer came back."""
    prompts = [prompt(11), prompt(12), prompt(13)][: 3 if third_of_a else 2]
    outs = [[] for _ in prompts]
    threads = [threading.Thread(target=stream_completion, args=(stack.url, p, 60, "a", o))
               for p, o in zip(prompts, outs)]
    engine = stack.workers[0].engines["tiny"]

    def running_for(steps):
        return lambda: sum(r.steps >= steps for r in engine.batch_view().running) == 2

    for t in threads[:2]:
        t.start()
    wait_for(running_for(0), what="a's two requests to start")
    if third_of_a:
        threads[2].start()
        fq = FairQueue(stack.workers[0].worker.r, stack.sched)
        wait_for(lambda: fq.depth("tiny")["normal"] == 1, what="a's third request to wait")
    wait_for(running_for(stack.sched.preempt_min_run_steps), what="a's requests to be preemptible")
    b_text = completion_text(stack.url, prompt(14, 10), newcomer_tokens, "b")
    open_streams = [t.is_alive() for t in threads]
    for t in threads:
        t.join(120)
    return prompts, outs, b_text, open_streams


def test_a_newcomer_preempts_and_the_victim_resumes_here_with_identical_text(preempt_stack, rclient, tmp_path):
    """One user holds every row; another arrives and starts at once. The victim's KV
    waits in DRAM and it resumes on the same worker: every stream equals its run alone.
    The user's own third request never preempts its others. The preemption shows in
    Prometheus, the lifecycle events and the request row."""
    from prometheus_client import REGISTRY

    from metrics.exporter import Exporter
    from metrics.settings import ExporterSettings
    from metrics.store import ChdbStore

    w = preempt_stack.start_worker(step_delay_s=0.01)
    engine = w.engines["tiny"]
    alone = [completion_text(preempt_stack.url, p, 60, "solo") for p in (prompt(11), prompt(12), prompt(13))]
    b_alone = completion_text(preempt_stack.url, prompt(14, 10), 5, "solo")
    counter = {"model": "tiny", "reason": "share"}
    before = REGISTRY.get_sample_value("inferstack_preemptions_total", counter) or 0
    restores = engine.kv_store.stats.restores

    prompts, outs, b_text, open_streams = flood_then_newcomer(preempt_stack, 5, third_of_a=True)

    assert b_text == b_alone
    assert any(open_streams[:2]), "b should not have waited for a's streams to end"
    assert ["".join(o) for o in outs] == alone
    assert engine.preemptions == 1  # b's arrival only: a never preempts its own requests
    assert engine.kv_store.stats.restores == restores + 1  # resumed from its DRAM copy
    assert REGISTRY.get_sample_value("inferstack_preemptions_total", counter) == before + 1
    events = [f for _, f in rclient.xrange("is:events")]
    [preempted] = [f for f in events if f["kind"] == "preempted"]
    assert preempted["reason"] == "share" and preempted["preemptions"] == "1"
    victim = preempted["request_id"]
    resumed = [f for f in events if f["kind"] == "claimed" and f["request_id"] == victim][-1]
    assert (resumed["preemptions"], resumed["attempt"]) == ("1", "1")  # a resume is not another attempt

    store = ChdbStore(tmp_path / "chdb")
    exporter = Exporter(rclient, store, ExporterSettings(redis_url=preempt_stack.sched.redis_url,
                                                         chdb_path=tmp_path / "chdb", exporter_flush_s=0.05))
    exporter.run(burst=True)
    [row] = store.query("SELECT preemptions, preempted_s, attempts FROM requests WHERE request_id = {rid:String}",
                        {"rid": victim})
    assert row["preemptions"] == 1 and row["preempted_s"] > 0 and row["attempts"] == 1


def test_the_victim_resumes_on_another_worker_with_identical_text(preempt_stack, rclient):
    """The preempted request is taken by a second worker, which recomputes prompt plus
    the tokens already sent: the client's stream is still one and the same."""
    w1 = preempt_stack.start_worker(step_delay_s=0.01)
    alone = [completion_text(preempt_stack.url, p, 60, "solo") for p in (prompt(11), prompt(12))]
    w2 = preempt_stack.start_worker(setup=lambda w: w.claimer.paused.set())  # idle until the preemption
    result = {}

    def run():
        result["r"] = flood_then_newcomer(preempt_stack, 50)

    t = threading.Thread(target=run)
    t.start()
    wait_for(lambda: w1.engines["tiny"].preemptions == 1, what="the preemption")
    w2.worker.claimer.paused.clear()
    t.join(120)
    _, outs, _, _ = result["r"]
    assert ["".join(o) for o in outs] == alone
    claims = [f for _, f in rclient.xrange("is:events") if f["kind"] == "claimed"]
    assert any(f["worker"] == w2.worker.id for f in claims), "the second worker took nothing"


@pytest.mark.parametrize("flood_tier,newcomer_user", [("normal", "b"), ("low", "a2")])
def test_the_contract_a_qualifying_newcomer_starts_within_k_steps(engine_factory, rclient, flood_tier,
                                                                   newcomer_user):
    """The worst case: every row was just (re)filled, so nothing may be preempted for
    PREEMPT_MIN_RUN_STEPS steps. The real claimer (one look per step, as its thread
    does) and engine, stepped in turn: the newcomer's first token comes within
    K = PREEMPT_MIN_RUN_STEPS + 2 steps of its arrival, by share or by tier."""
    from gpu_worker.io import Claimer

    sched = SchedulerSettings(preempt_min_run_steps=4, lease_s=30)
    fq = FairQueue(rclient, sched)
    engine = engine_factory(max_seqs=4)
    out = Collector()

    class Publisher:
        def submit(self, batch):
            for o in batch:
                if getattr(o, "requeue", None):
                    fq.requeue("tiny", "w", o.request_id, o.requeue)
            out([o for o in batch if hasattr(o, "requeue")])

    claimer = Claimer(rclient, fq, "w", {"tiny": engine}, threading.Event(), Publisher(), threading.Event())
    for i in range(4):
        assert fq.enqueue(greq(f"f{i}", "a", [5 + i] * 8, 40, tier=flood_tier)).admitted
    claimer._claim_round()
    newcomer = greq("new", newcomer_user, [9, 9, 9], 4)
    assert fq.enqueue(newcomer).admitted
    for steps in range(1, 20):
        claimer._claim_round()
        engine.step(out)
        if out.events.get("new"):
            break
    assert steps <= sched.preempt_min_run_steps + 2, steps
    assert len(out.requeued) == 1 and out.requeued[0][2] == ("share" if flood_tier == "normal" else "tier")


# -- constrained requests ----------------------------------------------------------------

CITY = {"type": "object", "properties": {
    "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
    "note": {"type": "string", "maxLength": 12},
    "n": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["city", "note", "n"]}


def constrained(rid, user, tokens, constraint, max_tokens=120):
    return GenerateRequest(id=rid, model="tiny", prompt_token_ids=tokens, reply_to="x", user=user,
                           params=SamplingParams(max_tokens=max_tokens, temperature=0.0, constraint=constraint))


@pytest.mark.parametrize("resume_on", ["same", "other"])
def test_a_constrained_request_preempted_mid_output_resumes_inside_its_grammar(engine_factory, resume_on):
    """A request under a JSON schema is preempted halfway through its object by a
    newcomer that is constrained too. It resumes (its KV restored here, or recomputed
    elsewhere) with its tokens replayed into a fresh matcher: the whole output is the
    uninterrupted one, valid for the schema, and ends on the grammar's own stop."""
    import jsonschema

    from broker.messages import Constraint

    json_c = Constraint("json_schema", json.dumps(CITY))
    regex_c = Constraint("regex", "(yes|no)-[0-9]{2}")
    engine = engine_factory(max_seqs=1, max_prefill_tokens=64, kv_dram_bytes=64 << 20)
    a = constrained("a", "a", prompt(21), json_c)
    b = constrained("b", "b", prompt(22, 12), regex_c)
    for c in (json_c, regex_c):
        engine.grammars.get(c).result()  # compiled: the newcomer joins in the step that preempts
    out = Collector()
    engine.add(Claimed(a, 1), [])
    steps_until(engine, out, lambda: len(out.tokens("a")) >= 6)
    sent = list(out.events["a"])
    assert not sent[-1].finish_reason
    engine.add(Claimed(b, 1, victims=("a",), reason="share"), [])
    engine.step(out)
    assert out.requeued == [("a", "preempted", "share")]
    assert out.events["b"][0].start == 0  # the row it freed went to b at once
    steps_until(engine, out, lambda: "b" in out.done)
    target = engine if resume_on == "same" else engine_factory(max_seqs=1, kv_dram_bytes=64 << 20)
    restores = target.kv_store.stats.restores
    target.add(Claimed(a, 2, preemptions=1), sent)
    steps_until(target, out, lambda: "a" in out.done)
    text = "".join(e.text for e in out.events["a"])
    jsonschema.validate(json.loads(text), CITY)
    assert out.events["a"][-1].finish_reason == "stop"
    assert target.kv_store.stats.restores == restores + (resume_on == "same")
    reference = engine_factory(max_seqs=1)
    assert out.tokens("a") == uninterrupted(reference, a)
    b_text = "".join(e.text for e in out.events["b"])
    assert out.tokens("b") == uninterrupted(reference, b) and re.fullmatch("(yes|no)-[0-9]{2}", b_text)


def test_a_request_preempted_while_its_grammar_compiles_leaves_cleanly(engine_factory, monkeypatch):
    """A victim may still be waiting for its grammar (it holds a place, not a row): it
    goes back to the queue without a token, and its resume compiles and runs as new."""
    from broker.messages import Constraint

    engine = engine_factory(max_seqs=1)
    release = threading.Event()
    real = engine.grammars._compile
    monkeypatch.setattr(engine.grammars, "_compile", lambda *a: (release.wait(30), real(*a))[1])
    c = constrained("c", "c", [5, 6, 7], Constraint("regex", "[a-c]{4}"))
    out = Collector()
    engine.add(Claimed(c, 1), [])
    engine.step(out)
    assert engine.capacity() == 0 and not out.events
    engine.add(Claimed(greq("d", "d", [8, 9], 3), 1, victims=("c",), reason="tier"), [])
    steps_until(engine, out, lambda: "d" in out.done)
    assert out.requeued == [("c", "preempted", "tier")] and "c" not in out.events
    release.set()
    engine.add(Claimed(c, 2, preemptions=1), [])
    steps_until(engine, out, lambda: "c" in out.done)
    assert re.fullmatch("[a-c]{4}", "".join(e.text for e in out.events["c"]))
