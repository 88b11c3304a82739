"""Scheduling properties on the real Lua scripts and a real redis-server, driven by a
simulated clock (``now=``) so that waits are exact, not timed."""

import multiprocessing as mp
import random

import pytest

from broker.connection import sync_client
from broker.messages import GenerateRequest, SamplingParams, Tier
from scheduler.queue import FairQueue
from scheduler.settings import SchedulerSettings

MODEL = "m"


def req(rid, user, tier="normal", prompt=20, max_tokens=20):
    return GenerateRequest(id=rid, model=MODEL, prompt_token_ids=[1] * prompt,
                           params=SamplingParams(max_tokens=max_tokens), reply_to="x", user=user, tier=Tier(tier))


def settings(**kw):
    base = dict(max_queue=100_000, max_queue_per_user=100_000, aging_max_wait_s=30.0)
    return SchedulerSettings(**{**base, **kw})


def test_flooding_user_does_not_delay_a_light_user_beyond_one_batch(rclient):
    fq = FairQueue(rclient, settings())
    batch = 8
    for i in range(200):
        fq.enqueue(req(f"a{i}", "A"), now=0.0)
    t = 0.0
    fq.claim_batch(MODEL, "w", batch, now=t)  # A's first batch runs
    for k in range(5):  # B trickles in; one batch slot frees per tick
        fq.enqueue(req(f"b{k}", "B"), now=t)
        waited_claims = 0
        while True:
            t += 1.0
            got = [c.request.id for c in fq.claim_batch(MODEL, "w", 1, now=t).claimed]
            if f"b{k}" in got:
                break
            waited_claims += 1
        assert waited_claims <= batch, f"B waited {waited_claims} claims behind A's backlog"


@pytest.mark.parametrize("fair", [True, False])
def test_weights_two_to_one_in_tokens(rclient, fair):
    fq = FairQueue(rclient, settings(fairness=fair))
    rng = random.Random(3)
    weights = {"gold": 2.0, "plain": 1.0}
    for i in range(150):
        for user in weights:  # different request sizes: service is measured in tokens
            fq.enqueue(req(f"{user}{i}", user, prompt=rng.randint(5, 60), max_tokens=rng.randint(5, 60)),
                       weight=weights[user], timeout_s=1e6, now=float(i))
    served = {"gold": 0, "plain": 0}
    for c in fq.claim_batch(MODEL, "w", 120, now=200.0).claimed:
        served[c.request.user] += c.request.cost
    ratio = served["gold"] / served["plain"]
    if fair:
        assert 1.8 <= ratio <= 2.2, served
    else:
        assert 0.7 <= ratio <= 1.4, served  # FIFO ignores weights: the baseline


def test_low_tier_starts_within_the_aging_bound_under_sustained_high_load(rclient):
    bound = 30.0
    fq = FairQueue(rclient, settings(aging_max_wait_s=bound))
    t, n = 0.0, 0
    fq.enqueue(req("low", "L", tier="low"), now=t)
    started_at = None
    while t < 5 * bound:
        for _ in range(3):  # high work arrives faster than it drains: a growing backlog
            fq.enqueue(req(f"h{n}", f"H{n % 4}", tier="high"), now=t)
            n += 1
        got = [c.request.id for c in fq.claim_batch(MODEL, "w", 2, now=t).claimed]
        if "low" in got:
            started_at = t
            break
        t += 0.5
    assert started_at is not None and started_at <= bound + 0.5
    assert started_at >= bound - 0.5  # and not before it was overdue: high really went first


def test_normal_tier_is_not_starved_either(rclient):
    fq = FairQueue(rclient, settings(aging_max_wait_s=9.0))
    fq.enqueue(req("n0", "N", tier="normal"), now=0.0)
    t = 0.0
    for i in range(100):
        fq.enqueue(req(f"h{i}", "H", tier="high"), now=t)
        if "n0" in [c.request.id for c in fq.claim_batch(MODEL, "w", 1, now=t).claimed]:
            break
        t += 1.0
    assert t <= 9.0


def _worker_process(target, wid: str, seed: int, out: mp.Queue):
    client = sync_client(target)
    fq = FairQueue(client, settings(lease_s=0.5, max_attempts=100))
    rng = random.Random(seed)
    completed, idle = [], 0
    while idle < 40:
        res = fq.claim_batch(MODEL, wid, rng.randint(1, 5))
        if not res.claimed:
            idle += 1
            fq.reap(MODEL)
            fq.wait_for_work(MODEL, wid, 0.02)
            continue
        idle = 0
        for c in res.claimed:
            if rng.random() < 0.05:
                continue  # "crash" on this one: never complete; its lease lapses and it is reaped
            if fq.complete(MODEL, wid, c.request.id):
                completed.append(c.request.id)
    out.put(completed)


def test_many_worker_processes_one_queue_nothing_twice_nothing_lost(topology_target):
    """On a plain Redis and on a Redis Cluster."""
    client = sync_client(topology_target)
    fq = FairQueue(client, settings())
    ids = [f"r{i}" for i in range(400)]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker_process, args=(topology_target, f"w{i}", i, out)) for i in range(4)]
    for p in procs:
        p.start()
    rng = random.Random(0)
    for i, rid in enumerate(ids):
        fq.enqueue(req(rid, f"u{rng.randint(0, 9)}", tier=rng.choice(["high", "normal", "low"])))
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(10)
    completed = [rid for r in results for rid in r]
    assert len(completed) == len(set(completed)), "a request was completed twice"
    assert sorted(completed) == sorted(ids), f"lost: {set(ids) - set(completed)}"


def test_a_busy_lower_tier_does_not_outrank_fresh_high_work_before_it_is_overdue(rclient):
    fq = FairQueue(rclient, settings(aging_max_wait_s=30.0))
    for i in range(50):
        fq.enqueue(req(f"n{i}", "flood"), now=0.0)
    fq.enqueue(req("vip", "V", tier="high"), now=25.0)
    assert [c.request.id for c in fq.claim_batch(MODEL, "w", 1, now=25.0).claimed] == ["vip"]
    fq.enqueue(req("vip2", "V", tier="high"), now=31.0)
    assert [c.request.id for c in fq.claim_batch(MODEL, "w", 1, now=31.0).claimed] == ["n0"]  # starved 31 s


def test_an_overloaded_lower_tier_takes_at_most_every_other_slot_from_high(rclient):
    """The normal tier is backlogged far beyond the aging bound: its overdue requests
    alternate with high work, they never shut it out."""
    fq = FairQueue(rclient, settings(aging_max_wait_s=30.0))
    for i in range(300):
        fq.enqueue(req(f"n{i}", "flood"), timeout_s=1e6, now=0.0)
    for t in range(1, 120):
        fq.claim_batch(MODEL, "w", 1, now=float(t))  # one normal claim per second
    for i in range(4):
        fq.enqueue(req(f"vip{i}", "V", tier="high"), now=120.0)
    got = [c.request.id for c in fq.claim_batch(MODEL, "w", 6, now=120.5).claimed]
    assert [g.startswith("vip") for g in got] == [False, True, False, True, False, True]


def test_several_low_requests_each_start_within_about_the_bound(rclient):
    bound = 30.0
    fq = FairQueue(rclient, settings(aging_max_wait_s=bound))
    starts, t, n = {}, 0.0, 0
    for i in range(4):
        fq.enqueue(req(f"low{i}", f"L{i}", tier="low"), now=0.0)
    while len(starts) < 4 and t < 200:
        for _ in range(3):
            fq.enqueue(req(f"h{n}", f"H{n % 4}", tier="high"), now=t)
            n += 1
        for c in fq.claim_batch(MODEL, "w", 2, now=t).claimed:
            if c.request.id.startswith("low"):
                starts[c.request.id] = t
        t += 0.5
    assert len(starts) == 4 and max(starts.values()) <= bound + 2.0, starts
