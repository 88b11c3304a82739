"""The continuous-batching engine against unbatched greedy decoding, with sequences
joining and leaving mid-flight, chunked prefill packed with decoding, on the tiny model
(in float64, so only a real bug can flip an argmax)."""

import pytest
import torch

from broker.messages import Claimed, GenerateRequest, SamplingParams
from gpu_worker.text.engine import TextEngine
from gpu_worker.text.kvcache import cache_kwarg
from inferstack.registry import Modality, ModelSpec
from tests.engines import run_schedule


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def request(i, prompt, max_tokens, **kw):
    return GenerateRequest(id=f"r{i}", model="tiny", prompt_token_ids=prompt, reply_to="x",
                           params=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw))


def run(engine, schedule: dict[int, list[GenerateRequest]], max_steps=500):
    """schedule: step number -> requests that arrive before that step; returns each
    request's output tokens."""
    return {rid: [t for e in events for t in e[2]] for rid, events in run_schedule(engine, schedule, max_steps).items()}


@pytest.mark.parametrize("attention", ["slots", "sdpa"], ids=["slot-rows", "paged"])
def test_changing_batch_matches_unbatched_greedy(engine_factory, attention):
    """On CPU: the default slot rows (``slotcache``) and the paged cache (SDPA over blocks)."""
    engine = engine_factory(max_seqs=3, max_prefill_tokens=16, runner_options={"attention_backend": attention})
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 390, (n,), generator=g).tolist() for n in (5, 23, 9, 40, 3, 17, 31)]
    max_tokens = [12, 5, 20, 7, 15, 9, 11]
    reqs = [request(i, p, m) for i, (p, m) in enumerate(zip(prompts, max_tokens))]
    schedule = {0: reqs[:2], 3: reqs[2:4], 4: [reqs[4]], 9: reqs[5:]}
    outputs = run(engine, schedule)
    model = engine.runner.model
    for req in reqs:
        assert outputs[req.id] == reference_greedy(model, req.prompt_token_ids, req.params.max_tokens), req.id
    assert engine.planner.num_admitted == 0 and not engine.planner.waiting


def test_static_mode_also_matches(engine_factory):
    engine = engine_factory(max_seqs=4, static=True)
    reqs = [request(i, [5 + i] * (3 + i), 6 + i) for i in range(5)]
    outputs = run(engine, {0: reqs[:3], 2: reqs[3:]})
    for req in reqs:
        assert outputs[req.id] == reference_greedy(engine.runner.model, req.prompt_token_ids, req.params.max_tokens)


def test_abort_mid_batch_frees_the_slot(engine_factory):
    engine = engine_factory(max_seqs=2)
    a, b, c = request(0, [5, 6, 7], 50), request(1, [8, 9], 50), request(2, [10, 11], 4)
    engine.add(Claimed(a, 1), [])
    engine.add(Claimed(b, 1), [])
    done = []
    engine.step(lambda batch: done.extend(o.request_id for o in batch if o.request_done))
    assert engine.capacity() == 0
    engine.abort("r0")
    engine.step(lambda batch: done.extend(o.request_id for o in batch if o.request_done))
    assert "r0" in done and engine.capacity() == 1
    out = run(engine, {0: [c]})
    assert out["r2"] == reference_greedy(engine.runner.model, c.prompt_token_ids, 4)


def test_n_choices_with_seed_are_distinct_and_reproducible(engine_factory):
    engine = engine_factory(max_seqs=8)
    params = dict(max_tokens=8, temperature=1.0, ignore_eos=True, seed=123, n=3)
    r1 = GenerateRequest(id="a", model="tiny", prompt_token_ids=[5, 6], reply_to="x", params=SamplingParams(**params))
    r2 = GenerateRequest(id="b", model="tiny", prompt_token_ids=[5, 6], reply_to="x", params=SamplingParams(**params))
    by_choice: dict[tuple, list[int]] = {}

    def emit(batch):
        for o in batch:
            if o.event is not None:
                by_choice.setdefault((o.request_id, o.event.choice), []).extend(o.event.token_ids)

    engine.add(Claimed(r1, 1), [])
    for _ in range(3):
        engine.step(emit)
    engine.add(Claimed(r2, 1), [])  # same request later, in a different batch
    while engine.has_work():
        engine.step(emit)
    for choice in range(3):
        assert by_choice[("a", choice)] == by_choice[("b", choice)]
    assert len({tuple(by_choice[("a", c)]) for c in range(3)}) == 3


def test_resume_from_output_log_continues_exactly(engine_factory):
    """A worker died after publishing 5 tokens; the new one resumes and the joined
    stream equals an uninterrupted run."""
    from broker.messages import TokenEvent

    engine = engine_factory(max_seqs=4)
    req = request(0, [7, 8, 9, 10], 14)
    full = reference_greedy(engine.runner.model, req.prompt_token_ids, 14)
    log = [TokenEvent("r0", 0, 0, full[:2]), TokenEvent("r0", 0, 2, full[2:5])]
    events = []
    engine.add(Claimed(req, 2), log)
    while engine.has_work():
        engine.step(lambda batch: events.extend(o.event for o in batch if o.event is not None))
    assert events[0].start == 5
    assert full[:5] + [t for e in events for t in e.token_ids] == full


def test_a_request_claimed_again_while_held_runs_once(engine_factory):
    """Its lease lapsed (Redis failing over) and the claim came back to this worker:
    the old copy leaves without a release (which would end the new claim), the new
    one resumes from the log; one release, every token once."""
    engine = engine_factory(max_seqs=4)
    req = request(0, [7, 8, 9, 10], 14)
    full = reference_greedy(engine.runner.model, req.prompt_token_ids, 14)
    events, done = [], []

    def emit(batch):
        events.extend(o.event for o in batch if o.event is not None)
        done.extend(o.request_id for o in batch if o.request_done)

    engine.add(Claimed(req, 1), [])
    while sum(len(e.token_ids) for e in events) < 5:
        engine.step(emit)
    engine.add(Claimed(req, 2), list(events))  # the log holds what was published
    while engine.has_work():
        engine.step(emit)
    assert done == ["r0"] and engine.request_ids() == []
    tokens = {}
    for e in events:  # as the API reads them: by offset, repeats dropped
        for i, t in enumerate(e.token_ids):
            tokens.setdefault(e.start + i, t)
    assert [tokens[i] for i in range(len(tokens))] == full


def test_more_rows_than_the_initial_allocation(engine_factory):
    engine = engine_factory(max_seqs=20)
    reqs = [request(i, [5 + i % 7] * (2 + i % 5), 3 + i % 4) for i in range(20)]
    outputs = run(engine, {0: reqs[:5], 1: reqs[5:]})
    for req in reqs[::4]:
        assert outputs[req.id] == reference_greedy(engine.runner.model, req.prompt_token_ids, req.params.max_tokens)


def test_a_failing_step_hands_its_requests_back_and_the_engine_recovers(engine_factory, monkeypatch):
    engine = engine_factory(max_seqs=4)
    a = request(0, [5, 6], 5)
    engine.add(Claimed(a, 1), [])
    emitted = []
    real_forward = engine.runner.forward

    def boom(*args, **kw):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine.runner, "forward", boom)
    try:
        engine.step(emitted.extend)
    except RuntimeError as exc:
        engine.requeue_all(str(exc), emitted.extend)
    assert [(o.request_id, o.requeue, o.event.code, o.request_done) for o in emitted] == [
        ("r0", "failed", "engine_error", False)]
    assert not engine.has_work()
    monkeypatch.setattr(engine.runner, "forward", real_forward)
    b = request(1, [7, 8], 4)
    assert run(engine, {0: [b]})["r1"] == reference_greedy(engine.runner.model, b.prompt_token_ids, 4)


def test_cache_slots_interchange_with_dynamic_cache_and_legacy_tuples(engine_factory):
    """A cache computed by plain transformers (DynamicCache) continues in a slot of the
    engine's paged cache, and a slot continues in plain transformers, token for token."""
    from gpu_worker.text.kvcache import dynamic_cache_to_layers, layers_to_dynamic_cache

    engine = engine_factory(max_seqs=4)
    model, runner = engine.runner.model, engine.runner
    prompt = [11, 42, 7, 99, 3, 250, 18]
    ref = reference_greedy(model, prompt, 8)
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        first = int(out.logits[0, -1].argmax())
        layers = dynamic_cache_to_layers(out.past_key_values)
        legacy = tuple((layer.keys, layer.values) for layer in out.past_key_values.layers)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(layers, dynamic_cache_to_layers(legacy)))
    runner.cache.open(1, 64)
    runner.cache.from_layers(1, layers, len(prompt))
    tokens, pos = [first], len(prompt)
    for _ in range(7):
        logits = runner.forward([1], [[tokens[-1]]], [pos])
        tokens.append(int(logits[0].argmax()))
        pos += 1
    assert tokens == ref
    # and back: the slot as a DynamicCache drives plain transformers
    dyn = layers_to_dynamic_cache(runner.cache.to_layers(1, pos), model.config)
    with torch.inference_mode():
        nxt = model(input_ids=torch.tensor([[tokens[-1]]]), **{cache_kwarg(model): dyn}, use_cache=True)
    assert int(nxt.logits[0, -1].argmax()) == reference_greedy(model, prompt, 9)[-1]
    runner.cache.close(1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_engines_run(tiny_model_dir, dtype):
    spec = ModelSpec(name="tiny", modality=Modality.TEXT, path=str(tiny_model_dir))
    engine = TextEngine(spec, tiny_model_dir, device=torch.device("cpu"), dtype=dtype, max_seqs=4)
    reqs = [request(i, [5 + i] * (3 + i), 6) for i in range(3)]
    outputs = run(engine, {0: reqs[:2], 1: reqs[2:]})
    assert all(len(outputs[r.id]) == 6 for r in reqs)
    assert engine.runner.cache.keys[0].dtype == dtype
