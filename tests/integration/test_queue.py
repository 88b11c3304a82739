"""The queue's Lua scripts against a real redis-server."""

import random

import pytest

from broker import keys
from broker.messages import GenerateRequest, SamplingParams, Tier
from scheduler.policy import Batch, FairQueueModel, Running
from scheduler.queue import FairQueue
from scheduler.settings import SchedulerSettings

MODEL = "m"


def req(i, user="a", tier="normal", prompt=10, max_tokens=10, n=1):
    return GenerateRequest(id=f"r{i}", model=MODEL, prompt_token_ids=[1] * prompt,
                           params=SamplingParams(max_tokens=max_tokens, n=n), reply_to="is:reply:t", user=user,
                           tier=Tier(tier))


@pytest.fixture
def fq(rclient):
    return FairQueue(rclient, SchedulerSettings(lease_s=5, max_queue=100, max_queue_per_user=50))


def ids(result):
    return [c.request.id for c in result.claimed]


def test_claim_moves_to_in_flight_with_lease(fq, rclient):
    fq.enqueue(req(1), now=100.0)
    res = fq.claim_batch(MODEL, "w1", 4, now=101.0)
    assert ids(res) == ["r1"] and res.claimed[0].attempt == 1
    assert rclient.zscore(keys.leases(MODEL), "r1") == pytest.approx(106.0)
    assert rclient.hget(keys.request(MODEL, "r1"), "worker") == "w1"
    assert fq.depth(MODEL) == {"high": 0, "normal": 0, "low": 0}
    assert ids(fq.claim_batch(MODEL, "w2", 4, now=101.0)) == []  # nobody claims it twice


def test_claim_takes_what_is_waiting_up_to_n(fq):
    for i in range(5):
        fq.enqueue(req(i), now=100.0)
    assert len(ids(fq.claim_batch(MODEL, "w", 3, now=100.0))) == 3
    assert len(ids(fq.claim_batch(MODEL, "w", 3, now=100.0))) == 2


def test_light_user_is_not_stuck_behind_a_flood(fq):
    for i in range(100):
        fq.enqueue(req(i, user="A"), now=100.0)
    fq.claim_batch(MODEL, "w", 4, now=100.0)
    fq.enqueue(req(1000, user="B"), now=101.0)
    assert "r1000" in ids(fq.claim_batch(MODEL, "w", 2, now=101.0))


def test_higher_tier_first_then_aging_lifts_low(fq):
    fq.enqueue(req(1, tier="low"), now=100.0)
    fq.enqueue(req(2, tier="high"), now=100.5)
    assert ids(fq.claim_batch(MODEL, "w", 1, now=101.0)) == ["r2"]
    # keep high work arriving; after aging_max_wait_s the low request outranks it
    fq.enqueue(req(3, tier="high"), now=129.0)
    assert ids(fq.claim_batch(MODEL, "w", 1, now=129.5)) == ["r3"]
    fq.enqueue(req(4, tier="high"), now=130.0)
    assert ids(fq.claim_batch(MODEL, "w", 1, now=130.5)) == ["r1"]


def test_cancel_queued_and_running(fq, rclient):
    fq.enqueue(req(1), now=100.0)
    fq.enqueue(req(2), now=100.0)
    assert fq.cancel(MODEL, "r1") == "dequeued"
    assert ids(fq.claim_batch(MODEL, "w", 5, now=100.0)) == ["r2"]
    assert fq.cancel(MODEL, "r2") == "running"
    assert fq.extend_leases(MODEL, "w", ["r2"], now=101.0) == ["r2"]  # the worker learns to drop it
    assert fq.cancel(MODEL, "nope") == "gone"
    assert rclient.hgetall(keys.user_counts(MODEL)) == {}


def test_lapsed_lease_is_requeued_first_and_resumable(rclient):
    fq = FairQueue(rclient, SchedulerSettings(lease_s=5, worker_dead_s=0))  # leases only
    fq.enqueue(req(1), now=100.0)
    fq.enqueue(req(2), now=100.0)
    assert ids(fq.claim_batch(MODEL, "dead", 1, now=100.0)) == ["r1"]
    assert fq.extend_leases(MODEL, "dead", ["r1"], now=103.0) == []
    assert fq.reap(MODEL, now=107.0) == ([], [])  # lease ran to 108
    requeued, failed = fq.reap(MODEL, now=109.0)
    assert requeued == ["r1"] and failed == []
    res = fq.claim_batch(MODEL, "alive", 1, now=109.0)
    assert ids(res) == ["r1"] and res.claimed[0].attempt == 2
    assert fq.complete(MODEL, "dead", "r1") is False  # the zombie cannot complete it
    assert fq.complete(MODEL, "alive", "r1") is True


def test_a_worker_silent_for_a_few_heartbeats_is_dead_long_before_its_lease(rclient):
    fq = FairQueue(rclient, SchedulerSettings(lease_s=10, worker_dead_s=1.5))
    for i in (1, 2, 3):
        fq.enqueue(req(i), now=100.0)
    assert ids(fq.claim_batch(MODEL, "dies", 2, now=100.0)) == ["r1", "r2"]
    assert ids(fq.claim_batch(MODEL, "lives", 1, now=100.0)) == ["r3"]
    for t in (100.5, 101.0, 101.5, 102.0):  # only "lives" keeps renewing
        assert fq.extend_leases(MODEL, "lives", ["r3"], now=t) == []
    assert fq.reap(MODEL, now=101.4) == ([], [])  # 1.4 s of silence: not yet
    requeued, failed = fq.reap(MODEL, now=102.0)  # 2 s: dead, 8 s before its leases lapse
    assert sorted(requeued) == ["r1", "r2"] and failed == []
    assert rclient.zrange(keys.leases(MODEL), 0, -1) == ["r3"]
    res = fq.claim_batch(MODEL, "lives", 2, now=102.0)
    assert ids(res) == ["r1", "r2"] and [c.attempt for c in res.claimed] == [2, 2]
    # the worker was only slow: it hears at its next renewal that it lost them
    assert sorted(fq.extend_leases(MODEL, "dies", ["r1", "r2"], now=102.5)) == ["r1", "r2"]
    assert fq.reap(MODEL, now=102.6) == ([], [])


def test_emit_is_fenced_by_lease_owner(fq, rclient):
    from broker import messages
    from broker.messages import ErrorEvent, TokenEvent

    fq.enqueue(req(1), now=100.0)
    fq.claim_batch(MODEL, "w1", 1, now=100.0)
    pubsub = rclient.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("is:reply:t")
    ev = messages.encode(TokenEvent("r1", 0, 0, [5], "hi"))
    assert fq.emit(MODEL, "w1", "is:reply:t", [("r1", "owned", ev)]) == []
    assert fq.emit(MODEL, "w2", "is:reply:t", [("r1", "owned", ev), ("r1", "owned", ev)]) == ["r1"]
    err = messages.encode(ErrorEvent("r9", "deadline passed", code="deadline_exceeded"))
    assert fq.emit(MODEL, "w2", "is:reply:t", [("r9", "final", err)]) == []  # the scheduler's own verdict
    assert rclient.lrange(keys.output_log(MODEL, "r1"), 0, -1) == [ev.decode()]
    assert 0 < rclient.ttl(keys.output_log(MODEL, "r9")) <= fq.s.output_log_ttl_s
    got = []
    for _ in range(20):  # the subscribe confirmation reads as None too
        msg = pubsub.get_message(timeout=0.1)
        if msg is not None:
            got += messages.decode_batch(msg["data"])
    assert [type(e).__name__ for e in got] == ["TokenEvent", "ErrorEvent"]
    assert fq.output_log(MODEL, "r9") == []  # a resuming worker reads token events only
    pubsub.close()


def test_enqueue_retried_after_a_lost_reply_admits_once(fq):
    assert fq.enqueue(req(1), now=100.0).admitted
    assert fq.enqueue(req(1), now=100.1).admitted
    assert fq.depth(MODEL)["normal"] == 1


def test_out_of_attempts_fails(rclient):
    fq = FairQueue(rclient, SchedulerSettings(lease_s=1, max_attempts=2))
    fq.enqueue(req(1), now=100.0)
    for t in (100.0, 102.0):
        assert ids(fq.claim_batch(MODEL, "w", 1, now=t)) == ["r1"]
        fq.reap(MODEL, now=t + 1.5)
    assert fq.depth(MODEL)["normal"] == 0
    assert not rclient.exists(keys.request(MODEL, "r1"))


def test_deadline_passed_in_queue_is_expired_not_run(fq):
    fq.enqueue(req(1), timeout_s=5, now=100.0)
    fq.enqueue(req(2), timeout_s=50, now=100.0)
    res = fq.claim_batch(MODEL, "w", 5, now=110.0)
    assert ids(res) == ["r2"] and [r.id for r in res.expired] == ["r1"]


def test_backpressure_sheds_lower_tiers_first(rclient):
    fq = FairQueue(rclient, SchedulerSettings(max_queue=10, tier_share_low=0.5, tier_share_normal=0.8))
    results = {}
    for i in range(10):
        results[i] = fq.enqueue(req(i, user=f"u{i}", tier="low"), now=100.0).admitted
    assert sum(results.values()) == 5
    refused = fq.enqueue(req(50, tier="low"), now=100.0)
    assert refused.reason == "queue_full" and refused.retry_after_s >= 1
    assert fq.enqueue(req(60, tier="normal"), now=100.0).admitted
    assert fq.enqueue(req(61, tier="normal"), now=100.0).admitted
    assert fq.enqueue(req(62, tier="normal"), now=100.0).admitted
    assert not fq.enqueue(req(63, tier="normal"), now=100.0).admitted
    assert fq.enqueue(req(70, tier="high"), now=100.0).admitted
    assert fq.enqueue(req(71, tier="high"), now=100.0).admitted
    assert fq.enqueue(req(72, tier="high"), now=100.0).reason == "queue_full"
    assert not rclient.exists(keys.request(MODEL, "r72"))  # nothing half-enqueued


def test_per_user_cap(rclient):
    fq = FairQueue(rclient, SchedulerSettings(max_queue_per_user=2))
    assert fq.enqueue(req(1), now=1.0).admitted and fq.enqueue(req(2), now=1.0).admitted
    refused = fq.enqueue(req(3), now=1.0)
    assert refused.reason == "user_cap"
    assert fq.enqueue(req(4, user="other"), now=1.0).admitted
    assert fq.enqueue(req(5), user_cap=5, now=1.0).admitted  # a key's own cap overrides


def test_estimated_wait_beyond_deadline_is_refused(fq, rclient):
    rclient.hset(keys.drain(MODEL), mapping={"rate": "10", "t0": "0", "acc": "0"})  # 10 tokens/s
    for i in range(5):
        assert fq.enqueue(req(i, user=f"u{i}"), timeout_s=100, now=1.0).admitted  # 20 tokens each
    refused = fq.enqueue(req(9, user="x"), timeout_s=5, now=1.0)  # 100 tokens ahead = 10 s > 5 s
    assert refused.reason == "wait_exceeds_deadline" and refused.retry_after_s >= 5


def test_lua_claim_order_matches_python_twin(rclient):
    """Random workloads (users, weights, tiers, costs, n, times) through the Lua scripts
    and the plain-Python policy, with a simulated worker batch that finishes requests,
    steps, and preempts when full: claims, preempting claims (with their victims and
    reasons) and requeues must be identical."""
    rng = random.Random(7)
    settings = SchedulerSettings(aging_max_wait_s=6.0, max_queue=10_000, max_queue_per_user=10_000,
                                 preempt_min_run_steps=2)
    preempting_claims = 0
    for trial in range(15):
        rclient.flushall()
        fq = FairQueue(rclient, settings)
        model = FairQueueModel(max_wait_s=settings.aging_max_wait_s)
        weights = {u: rng.choice([1.0, 2.0, 0.5]) for u in "abcde"}
        slots = rng.choice([3, 4, 6])
        running: dict[str, Running] = {}
        now, n = 1000.0, 0
        got, want = [], []

        def admit(rid, user, tier, rows):
            running[rid] = Running(rid, user, tier, weights[user], rows, 0, 0)

        for _ in range(90):
            now += rng.uniform(0, 0.8)
            op = rng.random()
            if op < 0.45:
                user, tier = rng.choice("abcde"), rng.choice(["high", "normal", "low"])
                r = req(n, user=user, tier=tier, prompt=rng.randint(1, 50), max_tokens=rng.randint(1, 50),
                        n=rng.choice([1, 1, 1, 2, 4]))
                n += 1
                assert fq.enqueue(r, weight=weights[user], timeout_s=1e6, now=now).admitted
                model.enqueue(r.id, user, tier, r.cost, weights[user], now, seqs=r.seqs)
            elif op < 0.6:
                free = slots - sum(x.seqs for x in running.values())
                if free > 0:
                    res = fq.claim_batch(MODEL, "w", free, now=now)
                    got += ids(res)
                    want += model.claim(free, now)
                    for c in res.claimed:
                        admit(c.request.id, c.request.user, str(c.request.tier), c.request.seqs)
            elif op < 0.75:
                batch = Batch(slots, tuple(running.values()))
                res = fq.claim_preempting(MODEL, "w", batch, now=now)
                lua = [(c.request.id, list(c.victims), c.reason) for c in res.claimed]
                assert lua == model.claim_preempting(batch, settings.preempt_min_run_steps), f"trial {trial}"
                preempting_claims += len(lua)
                for c in res.claimed:
                    for v in c.victims:
                        del running[v]
                        assert fq.requeue(MODEL, "w", v, "preempted", now=now) == "requeued"
                        model.requeue(v)
                    admit(c.request.id, c.request.user, str(c.request.tier), c.request.seqs)
            elif op < 0.85 and running:
                done = rng.choice(sorted(running))
                del running[done]
                assert fq.complete(MODEL, "w", done)
                model.running.pop(done)
            else:
                for rid, x in list(running.items()):
                    running[rid] = Running(rid, x.user, x.tier, x.weight, x.seqs, x.work + rng.randint(1, 9),
                                           x.steps + 1)
        assert got == want, f"trial {trial}"
    assert preempting_claims > 20  # the workload really exercised preemption


def test_a_claim_counts_the_sequences_each_request_brings(fq):
    for i in range(3):
        fq.enqueue(req(i, user=f"u{i}", n=4), now=100.0)
    fq.enqueue(req(3, user="u3"), now=100.0)
    assert ids(fq.claim_batch(MODEL, "w", 8, now=100.0)) == ["r0", "r1"]  # 4 + 4 rows fill 8
    # the next in line (4 rows) does not fit in 3, and nothing jumps the line for the room
    assert ids(fq.claim_batch(MODEL, "w", 3, now=100.0)) == ["r2"]  # first in line: it runs, wider or not
    assert ids(fq.claim_batch(MODEL, "w", 3, now=100.0)) == ["r3"]


def test_per_user_state_is_dropped_once_nothing_waits(fq, rclient):
    """A user's finish tag, queue count and queues go when the tier drains; the fair
    order of what comes next is the same as with a fresh queue."""
    for i in range(300):  # 300 users seen once each, in bursts that are claimed in full
        fq.enqueue(req(i, user=f"user{i}"), now=100.0 + i)
        if i % 10 == 9:
            assert len(ids(fq.claim_batch(MODEL, "w", 10, now=100.0 + i))) == 10
    user_keys = [k for k in rclient.scan_iter(f"{keys.tag(MODEL)}:*") if "user" in k]
    assert user_keys == []
    state = rclient.hgetall(keys.tier_state(MODEL))
    assert not [f for f in state if "user" in f], state
    assert rclient.hlen(keys.user_counts(MODEL)) == 0
    assert rclient.zcard(keys.finish_tags(MODEL, "normal")) == 0


def test_finish_tags_the_virtual_time_passed_are_compacted_while_busy(fq, rclient):
    # a user who stopped sending while others keep the tier busy: its tag goes once
    # the virtual time passes it, well before the tier ever drains
    fq.enqueue(req("once", user="gone", max_tokens=1), now=100.0)
    for i in range(20):
        fq.enqueue(req(i, user="busy"), now=100.0)
    fq.claim_batch(MODEL, "w", 3, now=101.0)
    assert rclient.zscore(keys.finish_tags(MODEL, "normal"), "gone") is None
    assert rclient.zscore(keys.finish_tags(MODEL, "normal"), "busy") is not None


def test_the_claimer_fills_an_engine_by_sequences_not_requests(fq):
    """A worker with 8 free rows and requests of n=4 takes two of them, not eight."""
    import threading

    from gpu_worker.io import Claimer

    class Engine:
        def __init__(self):
            self.held = []

        def capacity(self):
            return 8 - sum(c.request.seqs for c in self.held)

        def add(self, claimed, log):
            self.held.append(claimed)

        def request_ids(self):
            return [c.request.id for c in self.held]

    class Publisher:
        def submit(self, batch):
            pass

    for i in range(5):
        fq.enqueue(req(i, user=f"u{i}", n=4))
    engine = Engine()
    claimer = Claimer(fq.r, fq, "w", {MODEL: engine}, threading.Event(), Publisher(), threading.Event())
    assert claimer._claim_round() == (2, True)  # noqa: SLF001
    assert claimer._claim_round() == (0, False)  # noqa: SLF001 - full: nothing more until rows free
    assert sum(c.request.seqs for c in engine.held) == 8


def test_preempted_request_goes_back_first_keeps_its_log_and_is_not_a_failed_attempt(rclient):
    fq = FairQueue(rclient, SchedulerSettings(lease_s=5, max_attempts=2))
    fq.enqueue(req(1), now=100.0)
    fq.enqueue(req(2), now=101.0)
    rclient.rpush(keys.output_log(MODEL, "r1"), "tokens so far")
    for t in (102.0, 104.0, 106.0):  # preempted three times: more than max_attempts claims
        res = fq.claim_batch(MODEL, "w", 1, now=t)
        assert ids(res) == ["r1"]  # back at the head of its user's queue each time
        assert fq.requeue(MODEL, "w", "r1", "preempted", now=t + 1) == "requeued"
        assert rclient.zscore(keys.leases(MODEL), "r1") is None  # lease released with the requeue
    res = fq.claim_batch(MODEL, "w2", 1, now=110.0)
    c = res.claimed[0]
    assert (c.request.id, c.attempt, c.preemptions, c.preempted_at) == ("r1", 4, 3, 107.0)
    assert c.preempted_s == pytest.approx(1.0 + 1.0 + 3.0)
    assert rclient.lrange(keys.output_log(MODEL, "r1"), 0, -1) == ["tokens so far"]
    assert fq.requeue(MODEL, "w", "r1", "preempted") == "gone"  # only the lease owner may
    assert fq.reap(MODEL, now=200.0) == (["r1"], [])  # one failed attempt so far: requeued
    assert ids(fq.claim_batch(MODEL, "w3", 1, now=200.0)) == ["r1"]
    assert fq.requeue(MODEL, "w3", "r1", "failed", now=201.0) == "failed"  # the second failure is the last
    assert not rclient.exists(keys.request(MODEL, "r1"))
    assert ids(fq.claim_batch(MODEL, "w", 1, now=202.0)) == ["r2"]


def test_a_failed_worker_hands_back_and_a_cancelled_request_is_dropped(fq, rclient):
    fq.enqueue(req(1), now=100.0)
    fq.enqueue(req(2, user="b"), now=100.0)
    assert ids(fq.claim_batch(MODEL, "w", 2, now=100.0)) == ["r1", "r2"]
    assert fq.cancel(MODEL, "r2") == "running"
    assert fq.requeue(MODEL, "w", "r1", "failed", now=101.0) == "requeued"
    assert fq.requeue(MODEL, "w", "r2", "failed", now=101.0) == "cancelled"
    assert not rclient.exists(keys.request(MODEL, "r2"))
    assert rclient.zcard(keys.leases(MODEL)) == 0
    res = fq.claim_batch(MODEL, "w", 2, now=102.0)
    assert ids(res) == ["r1"] and res.claimed[0].attempt == 2 and res.claimed[0].preemptions == 0


def test_preempting_claim_takes_only_qualifying_requests_with_their_victims(rclient):
    fq = FairQueue(rclient, SchedulerSettings(preempt_min_run_steps=3, max_queue_per_user=50))
    for i in range(4):
        fq.enqueue(req(i, user="flood"), now=100.0)
    fq.claim_batch(MODEL, "w", 4, now=100.0)
    batch = Batch(4, tuple(Running(f"r{i}", "flood", "normal", 1.0, 1, 10 + i, 5) for i in range(4)))
    fq.enqueue(req(10, user="flood"), now=101.0)  # the same user: never preempts itself
    assert ids(fq.claim_preempting(MODEL, "w", batch, now=101.0)) == []
    fq.enqueue(req(11, user="light"), now=101.0)
    fq.enqueue(req(12, user="light"), now=101.0)
    fq.enqueue(req(13, user="vip", tier="high"), now=101.0)
    res = fq.claim_preempting(MODEL, "w", batch, now=101.0)
    # vip by tier first (the least work lost: r0), then light by share (r1); light's
    # second request would put it over its share of 4/3 rows.
    assert [(c.request.id, c.victims, c.reason) for c in res.claimed] == [("r13", ("r0",), "tier"),
                                                                            ("r11", ("r1",), "share")]
    assert fq.depth(MODEL)["normal"] == 2
    young = Batch(4, tuple(Running(f"r{i}", "flood", "low", 1.0, 1, 10, 2) for i in range(4)))
    assert ids(fq.claim_preempting(MODEL, "w", young, now=102.0)) == []  # the thrash guard
