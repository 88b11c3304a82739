"""The preemption rule (scheduler.policy.pick_victims) on hand-made batches."""

from broker.messages import Batch, Running
from scheduler.policy import pick_victims


def run(rid, user, tier="normal", *, weight=1.0, seqs=1, work=100, steps=50):
    return Running(rid, user, tier, weight, seqs, work, steps)


def victims(batch, user, tier="normal", weight=1.0, need=1, min_run=4):
    got = pick_victims(batch, user, tier, weight, need, min_run)
    return None if got is None else ([v.rid for v in got[0]], got[1])


def test_higher_tier_takes_the_lowest_tier_first_then_the_least_work():
    batch = Batch(4, (run("n1", "a"), run("l1", "b", "low", work=90), run("l2", "c", "low", work=30),
                      run("n2", "d")))
    assert victims(batch, "e", "high") == (["l2"], "tier")
    assert victims(batch, "e", "normal") == (["l2"], "tier")
    assert victims(batch, "e", "low") is None  # nobody over a share of 4/5 by a whole row


def test_same_tier_newcomer_takes_from_the_user_most_over_its_share():
    batch = Batch(6, (run("a1", "a"), run("a2", "a"), run("a3", "a"), run("a4", "a", work=5),
                      run("b1", "b", work=1), run("b2", "b", work=1)))
    assert victims(batch, "c") == (["a4"], "share")  # a is 2 rows over its share of 2, b is at it


def test_a_user_never_preempts_itself_nor_under_its_share():
    batch = Batch(2, (run("a1", "a"), run("a2", "a")))
    assert victims(batch, "a") is None
    assert victims(batch, "b") == (["a1"], "share")
    after = Batch(2, (run("a2", "a"), run("b1", "b", steps=50)))
    assert victims(after, "a") is None  # the preempted request cannot take its row back


def test_weights_set_the_shares():
    batch = Batch(6, tuple(run(f"p{i}", "plain") for i in range(6)))
    # gold (weight 2) may hold 4 of 6 rows: it preempts until it has them, then stops
    for held in range(4):
        batch = Batch(6, tuple(run(f"g{i}", "gold", weight=2.0) for i in range(held))
                      + tuple(run(f"p{i}", "plain") for i in range(6 - held)))
        assert victims(batch, "gold", weight=2.0) is not None
    batch = Batch(6, tuple(run(f"g{i}", "gold", weight=2.0) for i in range(4))
                  + tuple(run(f"p{i}", "plain") for i in range(2)))
    assert victims(batch, "gold", weight=2.0) is None


def test_the_thrash_guard_protects_fresh_sequences():
    batch = Batch(2, (run("a1", "a", "low", steps=3), run("a2", "a", "low", steps=4)))
    assert victims(batch, "b", "high", min_run=4) == (["a2"], "tier")
    assert victims(batch, "b", "high", min_run=5) is None


def test_n_choices_need_enough_rows_and_a_batch_with_room_needs_none():
    batch = Batch(4, (run("a1", "a", "low"), run("a2", "a", "low", seqs=2), run("b1", "b")))
    assert victims(batch, "c", "normal", need=3) == (["a1", "a2"], "tier")
    assert victims(batch, "c", "normal", need=4) is None  # b's row is not preemptible
    assert pick_victims(Batch(5, batch.running), "c", "normal", 1.0, 1, 4) == ([], "")
