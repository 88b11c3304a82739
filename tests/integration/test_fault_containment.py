"""One request's trouble stays with it: a poisoned row, a failing detokenizer, or a
worker-wide failure (the step raising) — on the tiny model in float64, then through
the real API, worker and redis-server."""

import json
import threading
import time

import httpx
import pytest

from broker import messages
from broker.messages import GenerateRequest, SamplingParams, TokenEvent
from scheduler.queue import Claimed, FairQueue
from scheduler.settings import SchedulerSettings
from tests.integration.test_engine import reference_greedy
from tests.sse import errors as error_events
from tests.sse import stream, texts
from tests.stack import Stack
from tests.tiny import registry_toml


@pytest.fixture(scope="module")
def engine(engine_factory):
    return engine_factory(max_seqs=8)


def greq(rid, tokens, max_tokens=10, **params):
    return GenerateRequest(id=rid, model="tiny", prompt_token_ids=tokens, reply_to="x",
                           params=SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                                 **{"temperature": 0.0, **params}))


def run_all(engine, reqs):
    tokens: dict[str, list[int]] = {}
    errors, done = {}, set()

    def emit(batch):
        for o in batch:
            if isinstance(o.event, TokenEvent):
                tokens.setdefault(o.request_id, []).extend(o.event.token_ids)
            elif o.event is not None:
                errors[o.request_id] = o.event
            if o.request_done:
                done.add(o.request_id)

    for r in reqs:
        engine.add(Claimed(r, 1), [])
    for _ in range(200):
        if len(done) == len(reqs):
            return tokens, errors
        engine.step(emit)
    raise AssertionError("engine did not finish")


NEIGHBOURS = [[5, 6, 7, 8], [9, 10, 11], [40, 41, 42, 43, 44]]


@pytest.mark.parametrize("poison,kind", [
    (dict(repetition_penalty=1e-40), "invalid_request_error"),  # past the API's bounds: logits overflow
    (dict(min_tokens=5, stop_token_ids=tuple(range(400))), "invalid_request_error"),  # nothing left to sample
    (dict(temperature=1.0, repetition_penalty=1e-40), "invalid_request_error"),
])
def test_a_poisoned_row_fails_alone(engine, poison, kind):
    model = engine.runner.model
    neighbours = [greq(f"n{i}", p) for i, p in enumerate(NEIGHBOURS)]
    tokens, errors = run_all(engine, neighbours[:2] + [greq("bad", [12, 13, 14], **poison)] + neighbours[2:])
    assert set(errors) == {"bad"} and errors["bad"].type == kind and errors["bad"].status == 400
    for r in neighbours:
        assert tokens[r.id] == reference_greedy(model, r.prompt_token_ids, 10)
    assert not engine.has_work()


def test_non_finite_logits_fail_their_request_as_a_server_error(engine, monkeypatch):
    sample_and_emit = engine._sample_and_emit

    def nan_for_one(logits, seqs, out):  # the model's output for one row goes bad
        logits = logits.clone()
        for row, seq in enumerate(seqs):
            if seq.request_id == "bad":
                logits[row] = float("nan")
        sample_and_emit(logits, seqs, out)

    monkeypatch.setattr(engine, "_sample_and_emit", nan_for_one)
    neighbours = [greq(f"n{i}", p) for i, p in enumerate(NEIGHBOURS)]
    tokens, errors = run_all(engine, [greq("bad", [12, 13, 14])] + neighbours)
    assert set(errors) == {"bad"} and (errors["bad"].type, errors["bad"].code) == ("server_error", "numeric_error")
    for r in neighbours:
        assert tokens[r.id] == reference_greedy(engine.runner.model, r.prompt_token_ids, 10)


def test_an_exception_in_one_sequences_output_processing_fails_only_it(engine, monkeypatch):
    from gpu_worker.text import output

    push = output.OutputProcessor.push

    def fragile(self, token_id):
        if getattr(self, "poisoned", False):
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad byte")
        return push(self, token_id)

    monkeypatch.setattr(output.OutputProcessor, "push", fragile)
    admit = engine._admit

    def poison_one(claimed, log_events, out):
        admit(claimed, log_events, out)
        if claimed.request.id == "bad":
            for seq in engine._requests["bad"].seqs:
                seq.output.poisoned = True

    monkeypatch.setattr(engine, "_admit", poison_one)
    neighbours = [greq(f"n{i}", p) for i, p in enumerate(NEIGHBOURS)]
    tokens, errors = run_all(engine, [greq("bad", [12, 13, 14], n=2)] + neighbours)
    assert set(errors) == {"bad"} and (errors["bad"].type, errors["bad"].code) == ("server_error", "output_error")
    for r in neighbours:
        assert tokens[r.id] == reference_greedy(engine.runner.model, r.prompt_token_ids, 10)


# -- through the stack ------------------------------------------------------------------


def completion(url, tokens, max_tokens=12, **extra):
    r = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": tokens, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **extra})
    return r


@pytest.fixture
def stack(redis_url, tiny_model_dir, tmp_path):
    registry = registry_toml(tmp_path / "models.toml", tiny_model_dir, max_batch=4)
    s = Stack(redis_url, registry, tmp_path / "cache", sched=SchedulerSettings(redis_url=redis_url, lease_s=3),
              worker_kw={"dtype": "float64"})  # exact: a resumed stream must match token for token
    yield s
    s.stop()


@pytest.mark.parametrize("extra", [{"repetition_penalty": 1e-40}, {"repetition_penalty": 0.01}, "stop_all"])
def test_parameters_that_would_poison_a_row_are_refused_up_front(stack, extra):
    if extra == "stop_all":  # with the end-of-sequence token they cover the vocabulary: nothing to sample
        tokenizer = stack.workers[0].engines["tiny"].tokenizer
        extra = {"min_tokens": 2, "stop_token_ids": [t for t in range(len(tokenizer)) if t != tokenizer.eos_token_id]}
    r = completion(stack.url, [5, 6, 7], **extra)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] in ("repetition_penalty", "stop_token_ids")


def test_a_poisoned_request_in_the_batch_leaves_its_neighbours_untouched(stack, rclient):
    """A request whose parameters slipped past the API (enqueued straight into the
    queue) fails alone with an OpenAI-shaped error; the API's clients in the same batch
    get the text they get without it."""
    alone = [completion(stack.url, p).json()["choices"][0]["text"] for p in NEIGHBOURS]
    fq = FairQueue(rclient, stack.sched)
    replies = rclient.pubsub(ignore_subscribe_messages=True)
    replies.subscribe("is:reply:poisoned")
    claimer = stack.workers[0].worker.claimer
    claimer.paused.set()  # let the whole batch gather, then run it together
    try:
        poison = GenerateRequest(id="poison", model="tiny", prompt_token_ids=[12, 13], reply_to="is:reply:poisoned",
                                 params=SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1e-40))
        assert fq.enqueue(poison).admitted
        results = [None] * len(NEIGHBOURS)

        def send(i):
            results[i] = completion(stack.url, NEIGHBOURS[i])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(NEIGHBOURS))]
        for t in threads:
            t.start()
        while sum(fq.depth("tiny").values()) < 1 + len(NEIGHBOURS):
            threading.Event().wait(0.02)
    finally:
        claimer.paused.clear()
    for t in threads:
        t.join(60)
    assert [r.json()["choices"][0]["text"] for r in results] == alone
    deadline = time.monotonic() + 10
    msg = None
    while msg is None and time.monotonic() < deadline:
        msg = replies.get_message(timeout=1)
    replies.close()
    [error] = messages.decode_batch(msg["data"])
    assert (error.request_id, error.type, error.status) == ("poison", "invalid_request_error", 400)


def test_a_worker_wide_failure_requeues_instead_of_failing(stack):
    """The step raises (as on a device out of memory) mid-generation: the requests go
    back to the queue with their output logs and finish, each one complete stream."""
    expected = completion(stack.url, NEIGHBOURS[0], max_tokens=30).json()["choices"][0]["text"]
    engine = stack.workers[0].engines["tiny"]
    forward = engine.runner.forward
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 12:
            raise RuntimeError("CUDA out of memory (simulated)")
        return forward(*a, **k)

    engine.runner.forward = flaky
    try:
        with httpx.stream("POST", f"{stack.url}/v1/completions", timeout=60, json={
                "model": "tiny", "prompt": NEIGHBOURS[0], "max_tokens": 30, "temperature": 0, "ignore_eos": True,
                "stream": True}) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    finally:
        engine.runner.forward = forward
    assert calls["n"] > 12  # it failed, and ran again after
    assert "error" not in chunks[-1]
    assert "".join(c["choices"][0]["text"] for c in chunks if c.get("choices")) == expected


def test_a_stream_handed_back_while_its_client_is_away_resumes_with_exactly_the_rest(stack):
    """The client hangs up; while nobody reads, the step fails and the request goes back
    to the queue and runs again from its output log. The client resumes its stream with
    Last-Event-ID (issue 12) and gets exactly the rest, as if nothing had happened."""
    url = f"{stack.url}/v1/completions"
    body = {"model": "tiny", "prompt": NEIGHBOURS[1], "max_tokens": 30, "temperature": 0, "ignore_eos": True,
            "stream": True, "user": "alice"}
    reference = stream("POST", url, json=body)
    engine = stack.workers[0].engines["tiny"]
    forward = engine.runner.forward
    hung_up = threading.Event()
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 12:  # well after the events the client reads before it hangs up
            hung_up.wait(30)
            raise RuntimeError("CUDA out of memory (simulated)")
        return forward(*a, **k)

    engine.runner.forward = flaky
    try:
        head = stream("POST", url, json=body, limit=4)
        hung_up.set()
        rest = stream("GET", f"{url}/{head[0].json['id']}/stream", params={"user": "alice"},
                      headers={"Last-Event-ID": head[-1].id})
    finally:
        engine.runner.forward = forward
    assert calls["n"] > 12  # it failed, and ran again after
    assert not error_events(rest) and rest[-1].data == "[DONE]"
    assert [e.id for e in head + rest] == [e.id for e in reference]  # nothing twice, nothing missing
    assert texts(head + rest) == texts(reference)
