import pytest
import torch

from broker.prefix import BLOCK, prefix_hashes
from gpu_worker.text.kvstore import KvStore, common_prefix


def layers(tokens, layers_n=2):
    return [(torch.full((1, tokens, 4), float(i)), torch.full((1, tokens, 4), -float(i))) for i in range(layers_n)]


def nbytes(tokens, layers_n=2):
    return layers_n * 2 * tokens * 4 * 4


def test_accounting_is_exact_and_lru_evicts_by_bytes():
    store = KvStore(budget_bytes=nbytes(10) * 3)
    for k in "abc":
        assert store.put(k, "session", list(range(10)), layers(10))[0] is not None
    assert store.bytes_used == nbytes(10) * 3
    store.acquire(store.entries["a"])  # "a" becomes most recently used ...
    store.release(store.entries["a"])
    entry, evicted = store.put("d", "session", list(range(10)), layers(10))
    assert entry is not None and [e.key for e in evicted] == ["b"]  # ... so "b" is the LRU victim
    assert set(store.entries) == {"a", "c", "d"} and store.bytes_used == nbytes(10) * 3


def test_entries_in_use_are_never_evicted():
    store = KvStore(budget_bytes=nbytes(10) * 2)
    store.put("a", "session", [1] * 10, layers(10))
    store.put("b", "session", [1] * 10, layers(10))
    store.acquire(store.entries["a"])
    store.acquire(store.entries["b"])
    entry, evicted = store.put("c", "session", [1] * 10, layers(10))
    assert entry is None and evicted == [] and set(store.entries) == {"a", "b"}
    store.release(store.entries["a"])
    entry, evicted = store.put("c", "session", [1] * 10, layers(10))
    assert entry is not None and [e.key for e in evicted] == ["a"]


def test_session_match_reuses_the_common_prefix_and_leaves_one_token():
    store = KvStore(budget_bytes=1 << 20)
    store.put("s", "session", [1, 2, 3, 4, 5, 6], layers(6))
    entry, n = store.match([1, 2, 3, 9, 9], "s", [])
    assert entry.key == "s" and n == 3
    assert store.match([1, 2, 3, 4, 5, 6], "s", [])[1] == 5  # the last prompt token is always recomputed
    assert store.match([7, 7], "s", []) is None
    assert store.match([1, 2, 3], "other-session", []) is None
    assert store.stats.hits == 2 and store.stats.misses == 2


def test_prefix_entries_serve_any_whole_block_prefix():
    store = KvStore(budget_bytes=1 << 24)
    system = list(range(3 * BLOCK))
    store.put("prefix:x", "prefix", system, layers(3 * BLOCK))
    other = system[: 2 * BLOCK] + [999] * 50  # shares two of the three blocks
    entry, n = store.match(other, None, prefix_hashes(other))
    assert entry.key == "prefix:x" and n == 2 * BLOCK
    assert store.match([5] * 200, None, prefix_hashes([5] * 200)) is None


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([], [1]) == 0


def test_cpu_layers_are_kept_as_handed_over_and_readable_at_once():
    store = KvStore(budget_bytes=1 << 20)
    given = layers(6)
    entry, _ = store.put("s", "session", list(range(6)), given)
    assert entry.ready is None and entry.layers is given  # to_layers already made them a private copy


def test_a_failed_copy_to_host_leaves_the_store_as_it_was(monkeypatch):
    from gpu_worker.text import kvstore

    store = KvStore(budget_bytes=nbytes(10) * 2)
    store.put("s", "session", [1] * 10, layers(10))
    store.put("t", "session", [2] * 10, layers(10))

    def broken(_):
        raise RuntimeError("CUDA error: out of memory (pinned)")

    monkeypatch.setattr(kvstore, "to_host", broken)
    with pytest.raises(RuntimeError):
        store.put("s", "session", [1] * 12, layers(10))  # would replace s
    assert list(store.entries) == ["s", "t"] and store.bytes_used == nbytes(10) * 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_layers_go_to_pinned_host_memory_and_back():
    from gpu_worker.text.kvcache import PagedKVCache

    dev = torch.device("cuda")
    cache = PagedKVCache(2, 4, 1, 4, dtype=torch.bfloat16, device=dev, max_len=64, block_size=4)
    cache.open(1, 16)
    cache.open(2, 16)
    src = [((torch.randn(1, 6, 4, device=dev) + i).to(torch.bfloat16),) * 2 for i in range(2)]
    src = [(k, -k) for k, _ in src]
    cache.from_layers(1, src, 6)
    store = KvStore(budget_bytes=1 << 20)
    entry, _ = store.put("s", "session", list(range(6)), cache.to_layers(1, 6))
    for t in cache.keys + cache.values:  # later steps overwrite the blocks; the stored copy must not change
        t.zero_()
    stored = entry.layers  # waits for the device-to-host copy
    assert entry.ready is None
    assert all(t.device.type == "cpu" and t.is_pinned() and t.dtype == torch.bfloat16 for kv in stored for t in kv)
    assert all(torch.equal(a.cpu(), b) for (ka, va), (kb, vb) in zip(src, stored) for a, b in ((ka, kb), (va, vb)))
    cache.from_layers(2, stored, 6)
    torch.cuda.synchronize()
    back = cache.to_layers(2, 6)
    assert all(torch.equal(a.cpu(), b) for (ka, va), (kb, vb) in zip(back, stored) for a, b in ((ka, kb), (va, vb)))


def test_prefix_entries_serve_only_their_own_cache_scope():
    store = KvStore(budget_bytes=1 << 24)
    system = list(range(2 * BLOCK)) + [7]
    store.put("prefix:a", "prefix", system[: 2 * BLOCK], layers(2 * BLOCK), scope="tenant-a")
    assert store.match(system, None, prefix_hashes(system, "tenant-a"), "tenant-a")[1] == 2 * BLOCK
    # another tenant's identical prompt hashes apart, so it finds nothing ...
    assert prefix_hashes(system, "tenant-b") != prefix_hashes(system, "tenant-a")
    assert store.match(system, None, prefix_hashes(system, "tenant-b"), "tenant-b") is None
    # ... and even presenting tenant a's hashes does not make it tenant a's
    assert store.match(system, None, prefix_hashes(system, "tenant-a"), "tenant-b") is None


def test_a_prefix_hit_compares_token_ids_not_only_the_hash():
    store = KvStore(budget_bytes=1 << 24)
    stored = list(range(2 * BLOCK))
    store.put("prefix:x", "prefix", stored, layers(2 * BLOCK))
    # a prompt whose second block differs but that presents the stored hashes (a
    # 64-bit collision, or a forged request): only the block that truly matches is reused
    forged = stored[:BLOCK] + [999] * BLOCK + [1]
    entry, n = store.match(forged, None, prefix_hashes(stored))
    assert n == BLOCK and entry.token_ids[:n] == forged[:n]
    assert store.match([5] * (2 * BLOCK + 1), None, prefix_hashes(stored)) is None


def test_session_keys_are_unambiguous():
    from api.routes._text import session_key

    assert session_key("p\0x", "y") != session_key("p", "x\0y")
    assert session_key("ab", "c") != session_key("a", "bc")
    assert session_key("u", "s") == session_key("u", "s") and session_key("u", None) is None
