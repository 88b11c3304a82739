"""The paged KV cache's bookkeeping: reservations, blocks taken as sequences grow,
references, sharing without copying, growth and shrinking of the pool."""

import pytest
import torch

from gpu_worker.text.kvcache import NULL_BLOCK, BlockPool, PagedKVCache


def make(blocks=16, slots=4, block_size=4, **kw):
    bpt = PagedKVCache.token_bytes(2, 1, 2, torch.float32)
    return PagedKVCache(2, slots, 1, 2, dtype=torch.float32, device=torch.device("cpu"), max_len=32,
                        block_size=block_size, budget_bytes=blocks * block_size * bpt, init_blocks=2, **kw)


def layers(length, value):
    return [(torch.full((1, length, 2), value) + torch.arange(length).view(1, -1, 1),
             -torch.full((1, length, 2), value))] * 2


def test_block_pool_reserves_takes_and_frees_lowest_first():
    pool = BlockPool(4)
    pool.reserve(3)
    assert pool.available() == 1
    with pytest.raises(MemoryError):
        pool.reserve(2)
    a, b = pool.take(), pool.take()
    assert (a, b) == (1, 2) and pool.reserved == 1 and pool.free == 2
    pool.ref(a)
    pool.unref(a)
    assert pool.refs[a] == 1  # still held once
    pool.unref(a)
    pool.unreserve(1)
    assert pool.available() == 3
    pool.reserve(1)
    assert pool.take() == 1  # the freed lowest block comes back first
    assert pool.highest_used() == 2


def test_admission_is_by_blocks_of_each_sequence_not_rows_times_the_longest():
    c = make(blocks=8)
    assert c.can_open(32)  # 8 blocks of 4
    c.open(0, 30)  # 8 blocks reserved
    assert not c.can_open(1)
    c.close(0)
    c.open(0, 5)  # 2 blocks
    c.open(1, 9)  # 3 blocks
    assert c.pool.available() == 3 and c.can_open(12) and not c.can_open(13)


def test_blocks_are_taken_as_the_sequence_grows_and_freed_without_moving_others():
    c = make()
    c.open(0, 20)
    c.open(1, 20)
    c.from_layers(0, layers(6, 1.0), 6)
    c.from_layers(1, layers(3, 2.0), 3)
    assert len(c.tables[0]) == 2 and len(c.tables[1]) == 1
    before = c.to_layers(1, 3)
    c.close(0)  # slot 1's blocks stay where they are
    assert c.tables[1] and torch.equal(c.to_layers(1, 3)[0][0], before[0][0])
    assert c.pool.free == c.num_blocks - 1
    k, v = c.to_layers(1, 3)[1]
    assert torch.equal(k[0, :, 0], torch.tensor([2.0, 3.0, 4.0])) and torch.all(v == -2.0)


def test_growing_past_the_reservation_is_refused():
    c = make()
    c.open(0, 4)
    c.prepare([0], [4])
    with pytest.raises(MemoryError):
        c.prepare([0], [5])


def test_attach_shares_whole_blocks_by_reference_and_copies_the_partial_one():
    c = make()
    c.open(0, 12)
    c.from_layers(0, layers(10, 1.0), 10)  # blocks: 4 + 4 + 2 tokens
    c.open(1, 16)
    reserved = c.pool.reserved
    c.attach(1, 0, 10)
    assert c.tables[1][:2] == c.tables[0][:2]  # shared, not copied
    assert c.tables[1][2] != c.tables[0][2]  # the partial block: a private copy
    assert c.pool.refs[c.tables[0][0]] == 2 and c.shared_blocks(1) == 2
    assert c.pool.reserved == reserved - 3  # two by reference, one taken
    assert torch.equal(c.to_layers(1, 10)[0][0], c.to_layers(0, 10)[0][0])
    c.close(0)  # the shared blocks stay with slot 1
    assert c.pool.refs[c.tables[1][0]] == 1
    assert torch.equal(c.to_layers(1, 10)[0][0], layers(10, 1.0)[0][0])
    c.close(1)
    assert c.pool.free == c.num_blocks and c.pool.reserved == 0


def test_the_pool_grows_on_demand_keeps_data_and_shrinks_when_its_top_is_free():
    c = make(blocks=64, slots=4)
    assert c.capacity == 2
    for slot in range(4):
        c.open(slot, 32)
        c.from_layers(slot, layers(32, float(slot)), 32)  # 8 blocks each
    assert c.capacity >= 33
    assert torch.equal(c.to_layers(0, 32)[0][0], layers(32, 0.0)[0][0])
    for slot in range(1, 4):
        c.close(slot)
    before = c.capacity
    c.shrink()
    assert c.capacity < before and torch.equal(c.to_layers(0, 32)[0][0], layers(32, 0.0)[0][0])
    assert torch.all(c.keys[0][: c.block_size] == 0)  # the null block stays zero


def test_block_table_tensor_follows_the_lists():
    c = make()
    c.open(2, 12)
    c.prepare([2], [9])
    assert c.table_host[2, :3].tolist() == c.tables[2] and c.table_host[2, 3] == NULL_BLOCK
    assert c.sync_table() is c.table_host  # on CPU the kernels read the host table
    c.close(2)
    assert not c.table_host[2].any()
