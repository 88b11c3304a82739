"""Constrained decoding inside the text engine, on the tiny random-weight model: its
unconstrained output is noise, so only a real grammar mask makes it valid JSON. Mixed
batches, n choices, resumes, compiles that fail or take long, and a row the grammar
leaves no token for."""

import json
import re
import threading

import jsonschema
import pytest
import torch

from broker.messages import Constraint, GenerateRequest, SamplingParams, TokenEvent
from gpu_worker.text.engine import TextEngine
from inferstack.registry import Modality, ModelSpec
from inferstack.structured import choice_ebnf
from scheduler.queue import Claimed

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
    "ok": {"type": "boolean"},
    "n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["city", "ok", "n"]}
JSON = Constraint("json_schema", json.dumps(SCHEMA))


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    spec = ModelSpec(name="tiny", modality=Modality.TEXT, path=str(tiny_model_dir))
    eng = TextEngine(spec, tiny_model_dir, device=torch.device("cpu"), dtype=torch.float32, max_seqs=8)
    yield eng
    eng.close()


def req(rid, prompt, max_tokens=60, constraint=None, **kw):
    kw.setdefault("temperature", 0.0)
    return GenerateRequest(id=rid, model="tiny", prompt_token_ids=prompt, reply_to="x",
                           params=SamplingParams(max_tokens=max_tokens, constraint=constraint, **kw))


class Collector:
    def __init__(self):
        self.events: dict[tuple[str, int], list[TokenEvent]] = {}
        self.errors: dict[str, object] = {}
        self.done: set[str] = set()

    def __call__(self, batch):
        for o in batch:
            if isinstance(o.event, TokenEvent):
                self.events.setdefault((o.request_id, o.event.choice), []).append(o.event)
            elif o.event is not None:
                self.errors[o.request_id] = o.event
            if o.request_done:
                self.done.add(o.request_id)

    def text(self, rid, choice=0) -> str:
        return "".join(e.text for e in self.events.get((rid, choice), []))

    def tokens(self, rid, choice=0) -> list[int]:
        return [t for e in self.events.get((rid, choice), []) for t in e.token_ids]

    def finish(self, rid, choice=0):
        return self.events[(rid, choice)][-1].finish_reason


def drain(engine, collector, reqs, steps=400):
    for r in reqs:
        engine.add(Claimed(r, 1), [])
    for _ in range(steps):
        if {r.id for r in reqs} <= collector.done:
            return collector
        engine.step(collector)
    raise AssertionError("engine did not finish")


def test_mixed_batch_constrained_rows_valid_and_free_rows_unchanged(engine):
    free = [req(f"free{i}", [5 + i, 9, 11 + i], 20, ignore_eos=True) for i in range(3)]
    alone = drain(engine, Collector(), free)
    constrained = [
        req("json", [5, 6, 7], constraint=JSON),
        req("choice", [8, 9], constraint=Constraint("ebnf", choice_ebnf(["alpha", "beta gamma", "café"]))),
        req("regex", [10, 11], constraint=Constraint("regex", r"(yes|no)-[0-9]{2}")),
    ]
    for r in constrained:  # compiled beforehand, so all six rows run in one batch from the start
        engine.grammars.get(r.params.constraint).result()
    mixed = drain(engine, Collector(), [constrained[0], free[0], constrained[1], free[1], constrained[2], free[2]])
    for r in free:
        assert mixed.tokens(r.id) == alone.tokens(r.id)
    jsonschema.validate(json.loads(mixed.text("json")), SCHEMA)
    assert mixed.text("choice") in ("alpha", "beta gamma", "café")
    assert re.fullmatch(r"(yes|no)-[0-9]{2}", mixed.text("regex"))
    assert all(mixed.finish(r.id) == "stop" for r in constrained)
    # The same noise model, unconstrained, writes none of that.
    plain = drain(engine, Collector(), [req("plain", [5, 6, 7])])
    assert not plain.text("plain").startswith("{")


def test_each_choice_has_its_own_matcher(engine):
    c = drain(engine, Collector(), [req("n3", [5, 6], constraint=JSON, n=3, temperature=1.0, seed=7)])
    outs = [json.loads(c.text("n3", i)) for i in range(3)]
    for out in outs:
        jsonschema.validate(out, SCHEMA)


def test_resumed_request_replays_its_tokens_into_a_fresh_matcher(engine):
    full = drain(engine, Collector(), [req("whole", [7, 8, 9], constraint=JSON)])
    tokens = full.tokens("whole")
    log = [TokenEvent("resumed", 0, 0, tokens[:3]), TokenEvent("resumed", 0, 3, tokens[3:6])]
    c = Collector()
    engine.add(Claimed(req("resumed", [7, 8, 9], constraint=JSON), 2), log)
    while "resumed" not in c.done:
        engine.step(c)
    assert c.events[("resumed", 0)][0].start == 6
    assert tokens[:6] + c.tokens("resumed") == tokens


def test_a_grammar_that_fails_to_compile_fails_its_request_alone(engine):
    c = drain(engine, Collector(), [req("bad", [5], constraint=Constraint("json_schema", '{"type": "foo"}')),
                                    req("good", [5, 6], 6, ignore_eos=True)])
    err = c.errors["bad"]
    assert (err.status, err.code) == (400, "invalid_json_schema") and "foo" in err.message
    assert ("bad", 0) not in c.events and len(c.tokens("good")) == 6


def test_waiting_for_a_compile_never_holds_up_the_batch(engine, monkeypatch):
    release = threading.Event()
    real = engine.grammars._compile

    def slow(*a):
        release.wait(30)
        return real(*a)

    monkeypatch.setattr(engine.grammars, "_compile", slow)
    slow_one = Constraint("regex", "[a-c]{3}")  # a constraint no other test compiled
    c = Collector()
    engine.add(Claimed(req("waits", [5, 6], constraint=slow_one), 1), [])
    engine.add(Claimed(req("runs", [7, 8], 5, ignore_eos=True), 1), [])
    for _ in range(20):
        engine.step(c)
        if "runs" in c.done:
            break
    assert "runs" in c.done and ("waits", 0) not in c.events
    assert engine.capacity() == engine.planner.max_seqs - 1  # the waiting request holds its place
    release.set()
    while "waits" not in c.done:
        engine.step(c)
    assert re.fullmatch("[a-c]{3}", c.text("waits"))


def test_a_row_with_no_allowed_token_fails_alone(engine, monkeypatch):
    """A grammar can leave no token to pick (here: a matcher that allows none after two
    tokens); that request fails with a 400, its batch goes on."""
    import gpu_worker.text.engine as engine_mod

    real_new = engine_mod.new_matcher

    class Dead:
        def __init__(self, inner):
            self.inner, self.n = inner, 0

        def fill_next_token_bitmask(self, bitmask, index):
            self.inner.fill_next_token_bitmask(bitmask, index)
            if self.n >= 2:
                bitmask[index] = 0

        def accept_token(self, tok):
            self.n += 1
            return self.inner.accept_token(tok)

        def is_terminated(self):
            return self.inner.is_terminated()

    monkeypatch.setattr(engine_mod, "new_matcher", lambda compiled, replay: Dead(real_new(compiled, replay)))
    c = drain(engine, Collector(), [req("dead", [5, 6], constraint=JSON), req("alive", [5, 7], 8, ignore_eos=True)])
    assert (c.errors["dead"].status, c.errors["dead"].code) == (400, "constraint_unsatisfiable")
    assert len(c.tokens("dead")) == 2 and len(c.tokens("alive")) == 8


def test_grammars_are_compiled_once_per_constraint(engine):
    before = engine.grammars.compiles
    drain(engine, Collector(), [req(f"same{i}", [5, i + 6], constraint=JSON) for i in range(3)])
    assert engine.grammars.compiles - before <= 1
