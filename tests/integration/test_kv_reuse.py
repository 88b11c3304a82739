"""KV reuse: session caches in DRAM and shared prefixes, on the engine (tiny model,
float64: reuse must not change a single token) and through the queue's routing."""

import time

import pytest
import torch

from broker.messages import Claimed, GenerateRequest, SamplingParams
from broker.prefix import BLOCK, prefix_hashes
from gpu_worker.text.engine import TextEngine
from inferstack.registry import Modality, ModelSpec
from scheduler import keys as qkeys
from scheduler.queue import FairQueue
from scheduler.settings import SchedulerSettings
from tests.integration.test_engine import reference_greedy, run


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    spec = ModelSpec(name="tiny", modality=Modality.TEXT, path=str(tiny_model_dir))
    return TextEngine(spec, tiny_model_dir, device=torch.device("cpu"), dtype=torch.float64, max_seqs=4,
                      max_prefill_tokens=64, kv_dram_bytes=64 << 20)


def turn(rid, prompt, n=10, session="s1"):
    return GenerateRequest(id=rid, model="tiny", prompt_token_ids=prompt, reply_to="x", session_key=session,
                           prefix_hashes=prefix_hashes(prompt),
                           params=SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))


def first_event_cached(engine, req):
    events = []
    engine.add(Claimed(req, 1), [])
    while engine.has_work():
        engine.step(lambda batch: events.extend(o.event for o in batch if o.event is not None))
    return events[0].cached_tokens, [t for e in events for t in e.token_ids]


def test_warm_turn_equals_recompute_and_edited_history_reuses_only_the_common_prefix(engine):
    model = engine.runner.model
    g = torch.Generator().manual_seed(5)
    t1 = torch.randint(3, 390, (40,), generator=g).tolist()
    cached, out1 = first_event_cached(engine, turn("t1", t1))
    assert cached == 0 and out1 == reference_greedy(model, t1, 10)
    t2 = t1 + out1 + torch.randint(3, 390, (25,), generator=g).tolist()
    cached, out2 = first_event_cached(engine, turn("t2", t2))
    assert cached == len(t1) + len(out1) - 1  # all but the last generated token (its KV was never computed)
    assert out2 == reference_greedy(model, t2, 10)
    edited = t2[:17] + [5, 6, 7] + t2[20:]  # a message changed in the middle of the history
    cached, out3 = first_event_cached(engine, turn("t3", edited))
    assert cached == 17 and out3 == reference_greedy(model, edited, 10)
    other = [9] * 30  # nothing in common: full prefill, never a wrong answer
    cached, out4 = first_event_cached(engine, turn("t4", other))
    assert cached == 0 and out4 == reference_greedy(model, other, 10)


def test_restored_sequences_join_a_running_batch(engine):
    model = engine.runner.model
    base = list(range(10, 60))
    first_event_cached(engine, turn("warm", base, session="s2"))
    follow = base + [77] * 12
    others = [turn(f"o{i}", [20 + i] * (5 + i), n=8, session=None) for i in range(3)]
    outputs = run(engine, {0: others[:2], 2: [turn("f", follow, session="s2")], 3: others[2:]})
    assert outputs["f"] == reference_greedy(model, follow, 10)
    for r in others:
        assert outputs[r.id] == reference_greedy(model, r.prompt_token_ids, 8)


def test_prefix_hit_across_users(engine):
    system = list(range(100, 100 + 2 * BLOCK))  # a shared "system prompt" of two blocks
    users = [system + [300 + i] * 7 for i in range(3)]
    engine.kv_store.stats.tokens_saved = 0
    assert first_event_cached(engine, turn("u0", users[0], session=None))[0] == 0
    assert first_event_cached(engine, turn("u1", users[1], session=None))[0] == 0  # now seen twice: stored
    cached, out = first_event_cached(engine, turn("u2", users[2], session=None))
    assert cached == 2 * BLOCK
    assert out == reference_greedy(engine.runner.model, users[2], 10)
    assert engine.kv_stats()["tokens_saved"] >= 2 * BLOCK


@pytest.mark.parametrize("attention", ["sdpa", "slots"], ids=["paged", "slot-rows"])
def test_running_sequences_share_a_restored_prefix(engine_factory, attention):
    """While the sequence whose prefill filled a stored prefix still runs, newcomers
    that reuse that prefix take its KV from it, not from DRAM: the paged cache
    references its blocks (every block free again once all have finished), slot rows
    copy its row. Their tokens are unchanged either way."""
    engine = engine_factory(max_seqs=4, max_prefill_tokens=64, kv_dram_bytes=64 << 20,
                            runner_options={"attention_backend": attention})
    system = list(range(200, 200 + 2 * BLOCK))
    users = [system + [310 + i] * (3 + i) for i in range(4)]
    first_event_cached(engine, turn("p0", users[0], session=None))  # the prefix seen once
    cache, stats = engine.runner.cache, engine.kv_store.stats
    shared_before, restores_before = stats.shared, stats.restores
    shared_blocks = []
    real = engine.planner.on_admit

    def spy(seq):
        real(seq)
        shared_blocks.append(cache.shared_blocks(seq.slot))

    engine.planner.on_admit = spy
    try:  # p1 is the second to send it: stored after its prefill, held in its blocks while it decodes
        outputs = run(engine, {0: [turn("p1", users[1], n=30, session=None)],
                               6: [turn("p2", users[2], session=None), turn("p3", users[3], session=None)]})
    finally:
        engine.planner.on_admit = real
    assert stats.restores - restores_before == 2 and stats.shared - shared_before == 2
    assert outputs["p1"] == reference_greedy(engine.runner.model, users[1], 30)
    for i in (2, 3):
        assert outputs[f"p{i}"] == reference_greedy(engine.runner.model, users[i], 10)
    if attention == "sdpa":
        assert shared_blocks == [0, 2, 2]  # p2 and p3 each reference both blocks of the system prompt
        assert not any(cache.pool.refs) and cache.pool.reserved == 0
    else:
        assert shared_blocks == [0, 0, 0]


def test_reuse_reports_index_changes(engine):
    engine.step(lambda b: None)  # flush whatever is pending
    batches = []
    engine.add(Claimed(turn("ix", [50] * 20, session="s-index"), 1), [])
    while engine.has_work():
        engine.step(batches.extend)
    ops = [op for o in batches if o.index_ops for op in o.index_ops]
    assert ("put", "s", "s-index", 20 + 10 - 1) in ops
    assert ("refresh", "s", "s-index", 29) in engine.index_refresh_ops()


# -- routing: affinity in the queue ------------------------------------------------


def greq(rid, session=None, hashes=()):
    return GenerateRequest(id=rid, model="m", prompt_token_ids=[1] * 10, params=SamplingParams(max_tokens=5),
                           reply_to="x", user="u", session_key=session, prefix_hashes=list(hashes))


def claim_ids(fq, worker, now):
    return [c.request.id for c in fq.claim_batch("m", worker, 4, now=now).claimed]


def test_affinity_offers_the_owner_first_then_anyone(rclient):
    fq = FairQueue(rclient, SchedulerSettings(affinity_window_s=2.0))
    fq.kv_index("m", "W", [("put", "s", "sess", 500)], ttl_s=30, now=100.0)
    fq.enqueue(greq("r1", session="sess"), now=100.0)
    assert rclient.llen(qkeys.worker_doorbell("m", "W")) == 1  # the owner is woken
    assert claim_ids(fq, "X", 100.5) == []  # reserved for W within the window
    assert claim_ids(fq, "W", 100.6) == ["r1"]
    fq.enqueue(greq("r2", session="sess"), now=101.0)
    fq.enqueue(greq("r3"), now=101.0)
    assert claim_ids(fq, "X", 101.1) == ["r3"]  # other work is not blocked behind it
    assert claim_ids(fq, "X", 103.5) == ["r2"]  # the owner was too slow: anyone recomputes


def test_dead_owner_means_no_affinity_and_the_index_entry_disappears(rclient):
    fq = FairQueue(rclient, SchedulerSettings(affinity_window_s=2.0))
    now = time.time()
    fq.kv_index("m", "W", [("put", "s", "sess", 500)], ttl_s=0.3, now=now)
    assert rclient.exists(qkeys.kv_session("m", "sess"))
    fq.enqueue(greq("r1", session="sess"), now=now + 1.0)  # W stopped refreshing: expired
    assert claim_ids(fq, "X", now + 1.0) == ["r1"]
    time.sleep(0.5)  # Redis expires the key itself once its last holder stops refreshing
    assert not rclient.exists(qkeys.kv_session("m", "sess"))


def test_prefix_holders_are_preferred_and_the_longest_wins(rclient):
    fq = FairQueue(rclient, SchedulerSettings(affinity_window_s=2.0))
    fq.kv_index("m", "A", [("put", "p", "h1", 64)], ttl_s=30, now=100.0)
    fq.kv_index("m", "B", [("put", "p", "h1", 64), ("put", "p", "h2", 128)], ttl_s=30, now=100.0)
    fq.enqueue(greq("r1", hashes=["h1", "h2", "h3"]), now=100.0)
    assert claim_ids(fq, "A", 100.1) == [] and claim_ids(fq, "B", 100.2) == ["r1"]
    fq.kv_index("m", "B", [("del", "p", "h2", 0)], ttl_s=30, now=100.0)
    fq.enqueue(greq("r2", hashes=["h1", "h2"]), now=100.5)
    assert rclient.hget(qkeys.request("m", "r2"), "aff") in ("A", "B")  # h1 is held by both


# -- through the API ---------------------------------------------------------------


def test_sessions_are_scoped_to_their_user(tiny_stack):
    import httpx

    url = f"{tiny_stack.url}/v1/chat/completions"
    history = [{"role": "user", "content": "Hello world"}]

    def ask(user, messages, **kw):
        body = {"model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                "user": user, **kw}
        return httpx.post(url, json=body, timeout=30).json()

    first = ask("alice", history, session_id="chat-1")
    history2 = history + [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                          {"role": "user", "content": "And then?"}]
    warm = ask("alice", history2, session_id="chat-1")
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    cold = ask("alice", history2)  # no session: nothing reused (the prompt is under one block)
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert cold["choices"][0]["message"]["content"] == warm["choices"][0]["message"]["content"]
    mallory = ask("mallory", history2, session_id="chat-1")  # same id, another user: another session
    assert mallory["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    header = httpx.post(url, json={"model": "tiny", "messages": history2, "max_tokens": 6, "temperature": 0,
                                   "ignore_eos": True, "user": "alice"},
                        headers={"X-Session-Id": "chat-1"}, timeout=30).json()
    assert header["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_one_conversations_own_history_is_not_duplicated_as_a_shared_prefix(engine):
    history = list(range(150, 150 + 2 * BLOCK))
    before = {k for k, e in engine.kv_store.entries.items() if e.kind == "prefix"}
    first_event_cached(engine, turn("c1", history, session="solo"))
    first_event_cached(engine, turn("c2", history + [7] * 20, session="solo"))  # same conversation again
    after = {k for k, e in engine.kv_store.entries.items() if e.kind == "prefix"}
    assert after == before  # only the session entry holds it


def test_a_failed_save_fails_no_request(engine, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("pin_memory: out of memory")

    monkeypatch.setattr(engine.kv_store, "put", broken)
    prompt = list(range(30, 70))
    cached, out = first_event_cached(engine, turn("fs1", prompt, session="s-fail"))
    assert out == reference_greedy(engine.runner.model, prompt, 10)
    monkeypatch.undo()
    cached, _ = first_event_cached(engine, turn("fs2", prompt + out + [5] * 4, session="s-fail"))
    assert cached == 0  # nothing was kept; the next turn recomputes


def test_bfloat16_sessions_restore_exactly_what_was_saved(tiny_model_dir):
    spec = ModelSpec(name="tiny", modality=Modality.TEXT, path=str(tiny_model_dir))
    bf16 = TextEngine(spec, tiny_model_dir, device=torch.device("cpu"), dtype=torch.bfloat16, max_seqs=2,
                      kv_dram_bytes=8 << 20)
    t1 = list(range(40, 80))
    _, out1 = first_event_cached(bf16, turn("b1", t1, session="sb"))
    entry = bf16.kv_store.entries["sb"]
    assert entry.layers[0][0].dtype == torch.bfloat16
    assert entry.nbytes == (len(t1) + len(out1) - 1) * bf16.runner.cache.bytes_per_token
    t2 = t1 + out1 + [7] * 5
    req = turn("b2", t2, session="sb")
    restored = []
    real_restore = bf16._restore

    def spy(seq):
        real_restore(seq)
        n = seq.num_cached
        restored.append([(kept, k[:, :n]) for (kept, _), (k, _) in zip(bf16.runner.cache.to_layers(seq.slot, n),
                                                                        entry.layers)])

    bf16.planner.on_admit = spy
    cached, out2 = first_event_cached(bf16, req)
    assert cached == len(t1) + len(out1) - 1 and len(out2) == 10
    assert all(torch.equal(row, stored) for row, stored in restored[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sessions_on_cuda_keep_their_kv_in_pinned_host_memory(tiny_model_dir):
    spec = ModelSpec(name="tiny", modality=Modality.TEXT, path=str(tiny_model_dir))
    gpu = TextEngine(spec, tiny_model_dir, device=torch.device("cuda"), dtype=torch.float64, max_seqs=4,
                     max_prefill_tokens=64, kv_dram_bytes=64 << 20)
    g = torch.Generator().manual_seed(7)
    t1 = torch.randint(3, 390, (40,), generator=g).tolist()
    _, out1 = first_event_cached(gpu, turn("c1", t1, session="sc"))
    entry = gpu.kv_store.entries["sc"]
    assert all(t.device.type == "cpu" and t.is_pinned() for kv in entry.layers for t in kv)
    t2 = t1 + out1 + torch.randint(3, 390, (25,), generator=g).tolist()
    cached, warm = first_event_cached(gpu, turn("c2", t2, session="sc"))
    assert cached == len(t1) + len(out1) - 1
    _, cold = first_event_cached(gpu, turn("c3", t2, session=None))
    assert warm == cold
