"""The CPU's slot-row KV cache: admission by rows at the longest length, rows freed in
place, growth and shrinking that keep what is in use, attach as a copy."""

import pytest
import torch

from gpu_worker.text.slotcache import SlotKVCache


def make(budget_tokens=None, slots=4, max_len=64, **kw):
    bpt = SlotKVCache.token_bytes(2, 1, 2, torch.float32)
    return SlotKVCache(2, slots, 1, 2, dtype=torch.float32, device=torch.device("cpu"), max_len=max_len,
                       budget_bytes=None if budget_tokens is None else budget_tokens * bpt, init_len=4, init_rows=1,
                       **kw)


def layers(length, value):
    return [(torch.full((1, length, 2), value) + torch.arange(length).view(1, -1, 1),
             -torch.full((1, length, 2), value))] * 2


def test_admission_counts_every_row_at_the_longest_admitted_length():
    c = make(budget_tokens=96)
    c.open(0, 48)
    assert c.can_open(48) and not c.can_open(49)  # 2 rows x 48 fits, 2 x 49 does not
    c.open(1, 10)
    assert not c.can_open(1)  # 3 rows x 48
    c.close(0)
    assert c.can_open(48)  # the newcomer takes row 0 again: still 2 rows
    assert not c.can_open(1000)  # asks for max_len (64): 2 rows x 64 > 96


def test_rows_are_freed_in_place_and_kept_through_growth_and_shrinking():
    c = make()
    for s in (0, 1, 2):
        c.open(s, 40)
    c.from_layers(0, layers(6, 1.0), 6)
    c.from_layers(2, layers(3, 2.0), 3)
    before = c.to_layers(2, 3)
    c.close(0)  # nothing moves
    c.prepare([1], [40])  # grows the length past its initial 4 columns
    assert c.capacity >= 40 and c.rows == 3  # as far as the highest open row
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(before, c.to_layers(2, 3)))
    c.close(1)
    c.close(2)
    c.open(0, 8)
    c.from_layers(0, layers(5, 3.0), 5)
    c.shrink()
    assert c.capacity < 40
    k, v = c.to_layers(0, 5)[1]
    assert torch.equal(k[0, :, 0], torch.arange(5) + 3.0) and torch.all(v == -3.0)


def test_growth_stops_at_the_budget():
    c = make(budget_tokens=3 * 20)
    for s in range(3):
        c.open(s, 20)
    c.prepare([0, 1, 2], [20, 20, 20])
    assert c.nbytes <= c.budget_bytes and (c.rows, c.capacity) == (3, 20)


def test_attach_copies_and_a_slot_cannot_grow_past_its_limit():
    c = make()
    c.open(0, 16)
    c.from_layers(0, layers(10, 1.0), 10)
    c.open(1, 16)
    c.attach(1, 0, 7)
    assert c.shared_blocks(1) == 0
    assert all(torch.equal(a[:, :7], b) for (a, _), (b, _) in zip(c.to_layers(0, 10), c.to_layers(1, 7)))
    with torch.inference_mode():
        c.keys[0][0].zero_()  # the source row changes; the copy does not
    assert c.to_layers(1, 7)[0][0][0, 3, 0] == 4.0
    with pytest.raises(MemoryError):
        c.prepare([1], [17])
