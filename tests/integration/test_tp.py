"""Tensor parallelism (gpu_worker.text.tp) on CPU with gloo: the text engine on two
ranks (this process leads as rank 0; rank 1 is a real ``inferstack worker`` follower
process) produces exactly what it produces on one device — continuous batching with
chunked prefill in packed steps, seeded sampling, n > 1, stop tokens, and DRAM session
caches saved, evicted and restored on every rank's shard."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from broker.prefix import BLOCK, prefix_hashes
from gpu_worker.text.kvcache import PagedKVCache
from gpu_worker.text.tp import TpRank, shard_model, split
from inferstack.redis_server import free_port
from inferstack.registry import Modality, ModelSpec
from tests.engines import run_schedule
from tests.tiny import build_tiny_llama
from tests.tp import CPU, start_follower, text_request, tp1_engine, tp2_engine


def test_split_is_contiguous_and_uneven():
    assert split(3, 2) == [2, 1]
    assert split(8, 2) == [4, 4]
    assert split(1536, 2) == [768, 768]
    assert split(5, 3) == [2, 2, 1]


def test_a_group_larger_than_the_kv_heads_is_refused(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with pytest.raises(ValueError, match="exceeds the model's 2 KV heads"):
        shard_model(model, TpRank(0, 3))


@pytest.fixture(scope="module")
def uneven_llama(tmp_path_factory):
    """3 KV heads and 9 query heads (SmolLM2-135M's layout, shrunk), an odd MLP width."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-uneven"), heads=9, kv_heads=3, hidden=144,
                            intermediate=129)


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-qwen3"), heads=4, kv_heads=2, hidden=64,
                            intermediate=96, arch="qwen3")


def tokens_of(events: list[tuple], choice: int = 0) -> list[int]:
    return [t for e in events if e[0] == choice for t in e[2]]


def workload(engine_run, vocab: int = 390) -> tuple[dict, dict, dict]:
    """Turn one: a changing batch (joins mid-flight, chunked prefill, slots reused),
    greedy and seeded sampling, n=2, a stop token, sessions. Turn two continues each
    session (its KV restored from the DRAM store, or recomputed where it was evicted).
    Three: requests sharing a system prompt, stored as a prefix once two have sent it;
    a later one references the running holder's blocks (``attach``)."""
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 23, 9, 40, 3, 17)]
    first = [
        text_request(0, prompts[0], 12, session="s0"),
        text_request(1, prompts[1], 6, session="s1"),
        text_request(2, prompts[2], 10, temperature=0.8, seed=11, n=2),
        text_request(3, prompts[3], 8, session="s3", top_k=20, temperature=1.0, seed=3),
        text_request(4, prompts[4], 14, stop_token_ids=(prompts[0][1],), min_tokens=2),
        text_request(5, prompts[5], 9, session="s5"),
    ]
    one = engine_run({0: first[:2], 2: first[2:4], 5: first[4:]})
    second = [text_request(10 + i, first[i].prompt_token_ids + tokens_of(one[f"r{i}"]) + [7, 8, 9], 6,
                           session=first[i].session_key) for i in (0, 1, 3, 5)]
    two = engine_run({0: second[:2], 1: second[2:]})
    system = torch.randint(3, vocab, (BLOCK,), generator=g).tolist()
    shared = [text_request(20 + i, system + [5 + i] * (2 + i), 24 if i < 2 else 6) for i in range(3)]
    for r in shared:
        r.prefix_hashes = prefix_hashes(r.prompt_token_ids)
    three = engine_run({0: shared[:2], 12: shared[2:]})
    return one, two, three


@pytest.mark.parametrize(("model", "attention"), [("uneven_llama", "slots"), ("tiny_qwen3", "sdpa")],
                         ids=["llama-slot-rows", "qwen3-paged"])
def test_two_ranks_equal_one(model, attention, request, tmp_path, one_thread):
    """Each rank's cache in the CPU's slot rows, and in the paged cache (GPUs' layout)."""
    model_dir = request.getfixturevalue(model)
    spec = ModelSpec(name="m", modality=Modality.TEXT, path=str(model_dir), max_batch=3)
    cfg = AutoConfig.from_pretrained(str(model_dir))
    token_bytes = PagedKVCache.token_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, torch.float64)
    # A DRAM store of 64 tokens, less than the sessions need: saves, evictions and restores all happen.
    kw = dict(max_seqs=3, max_prefill_tokens=16, kv_dram_bytes=64 * token_bytes,
              runner_options={"attention_backend": attention})
    reference = tp1_engine(spec, model_dir, torch.float64, **kw)
    want = workload(lambda s: run_schedule(reference, s))

    port = free_port()
    follower = start_follower(tmp_path, "m", model_dir, port, dtype="float64", max_batch=3, attention=attention)
    engine = tp2_engine(spec, model_dir, torch.float64, follower, port, **kw)
    try:
        got = workload(lambda s: run_schedule(engine, s))
        stats = engine.kv_stats()
    finally:
        engine.close()
    assert follower.wait(60) == 0, "the follower did not stop cleanly"
    assert got == want
    assert stats["restores"] >= 1 and stats["evictions"] >= 1 and stats["shared_restores"] >= 1, stats
    assert any(e[5] > 0 for events in got[1].values() for e in events), "no session cache was reused"
    # the shards really are shards: rank 0 holds its share of the heads
    assert engine.runner.cache.shape_tail[0] == split(cfg.num_key_value_heads, 2)[0]



class LoopbackGroup:
    """Stands in for the process group: what rank 0 broadcasts is replayed at once on
    a follower runner in this process (unsharded: a group of one)."""

    timeout_s = 3600.0

    def __init__(self, follower_runner):
        from gpu_worker.text.tp import FollowerRunner

        self.follower = FollowerRunner(follower_runner)
        self.targets = {"runner": self.follower, "cache": follower_runner.cache}
        self.last_send = 0.0
        self.sent: list[str] = []

    def loaded(self) -> None:
        pass

    def send(self, ops) -> None:
        for op in ops:
            if op[0] in ("runner", "cache"):
                self.sent.append(op[1])
                getattr(self.targets[op[0]], op[1])(*op[2])

    def close(self) -> None:
        pass


def cache_state(cache) -> tuple:
    """Everything but the tensors: block tables and references, or the slot rows' extents."""
    if hasattr(cache, "tables"):
        return cache.tables, cache.pool.refs, cache.pool.reserved, cache.capacity
    return cache.rows, cache.capacity, cache._limit, cache._used


@pytest.mark.parametrize("attention", ["slots", "sdpa"], ids=["slot-rows", "paged"])
def test_every_cache_change_reaches_the_followers(tiny_model_dir, attention):
    """The mirrored surface is complete: after a workload with joins, slots opened and closed,
    chunked prefill, session saves, evictions and restores, a follower that saw only
    the broadcast ops holds exactly rank 0's cache and store keys. (A new way to change
    the cache that is not in MIRRORED_*_OPS makes them differ here.)"""
    from gpu_worker.text.engine import make_runner
    from gpu_worker.text.tp import LeaderRunner

    spec = ModelSpec(name="m", modality=Modality.TEXT, path=str(tiny_model_dir), max_batch=3)
    cfg = AutoConfig.from_pretrained(str(tiny_model_dir))
    token_bytes = PagedKVCache.token_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, torch.float64)
    options = {"attention_backend": attention}
    engine = tp1_engine(spec, tiny_model_dir, torch.float64, max_seqs=3, max_prefill_tokens=16,
                        kv_dram_bytes=64 * token_bytes, runner_options=options)
    group = LoopbackGroup(make_runner(spec, tiny_model_dir, device=CPU, dtype=torch.float64, max_seqs=3, **options))
    engine.runner = LeaderRunner(engine.runner, group)
    engine.planner.slots = engine.runner.cache
    workload(lambda s: run_schedule(engine, s))
    engine.runner.cache.shrink()  # recorded; shipped with the next forward, or here:
    engine.runner._recorder.flush()
    mine, theirs = engine.runner._runner.cache, group.follower.cache
    assert cache_state(mine) == cache_state(theirs)
    assert all(torch.equal(a, b) for a, b in zip(mine.keys + mine.values, theirs.keys + theirs.values))
    assert set(group.follower.shards) == set(engine.kv_store.entries)
    assert {"forward", "open", "close", "attach", "save_kv", "restore_kv", "drop_kv"} <= set(group.sent)
    engine.close()


def test_a_follower_whose_rank_0_dies_exits(tiny_model_dir, tmp_path):
    """Rank 0 dies (here a stand-in that joins, sends one plan and crashes): the
    follower's wait for the next plan fails at once, and it exits with an error
    for its supervisor to see, rather than waiting forever."""
    import subprocess
    import sys

    port = free_port()
    follower = start_follower(tmp_path, "m", tiny_model_dir, port, tp_timeout_s=600)
    leader = subprocess.Popen([sys.executable, "-c", f"""
import os, torch
from gpu_worker.text.tp import TpGroup, TpRank
group = TpGroup(TpRank(0, 2), "127.0.0.1:{port}", torch.device("cpu"), timeout_s=600)
group.loaded()
group.send([("keepalive",)])
os._exit(3)
"""])
    assert leader.wait(120) == 3
    assert follower.wait(60) == 1  # long before the 600 s timeout
