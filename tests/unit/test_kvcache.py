import torch

from gpu_worker.text.kvcache import SlotKVCache


def make(**kw):
    return SlotKVCache(2, 32, 1, 2, dtype=torch.float32, device=torch.device("cpu"), max_len=64,
                       init_len=4, init_rows=2, **kw)


def fill(cache, row, length, value):
    cache.from_layers(row, [(torch.full((1, length, 2), value), torch.full((1, length, 2), -value))] * 2, length)


def test_growth_in_rows_and_length_keeps_data():
    c = make()
    fill(c, 0, 3, 1.0)
    fill(c, 1, 4, 2.0)
    c.ensure(rows=20, length=9, used_rows=25, used_len=4)  # used_rows may count rows not yet written
    assert c.rows >= 20 and c.capacity >= 9
    k, v = c.to_layers(1, 4)[0]
    assert torch.all(k == 2.0) and torch.all(v == -2.0)
    assert torch.all(c.keys[0][0, :, :3] == 1.0) and torch.all(c.keys[0][2:] == 0)


def test_shrink_after_the_crowd_leaves():
    c = make()
    c.ensure(rows=32, length=64, used_rows=0, used_len=0)
    big = c.nbytes
    fill(c, 0, 3, 5.0)
    c.shrink(used_rows=1, used_len=3)
    assert c.nbytes < big / 8
    assert torch.all(c.keys[1][0, :, :3] == 5.0)


def test_row_moves():
    c = make()
    fill(c, 0, 2, 1.0)
    fill(c, 1, 2, 2.0)
    c.swap_rows(0, 1)
    assert c.keys[0][0, 0, 0, 0] == 2.0 and c.keys[0][1, 0, 0, 0] == 1.0
    c.move_row(1, 0)
    assert c.keys[0][0, 0, 0, 0] == 1.0
