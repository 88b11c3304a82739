"""The queue on a real Redis Cluster, with two models whose hash slots sit on different
primaries: every script runs on the model's node and writes only there, an idle
worker wakes for either model, cancellations reach the workers of either model."""

import threading

import pytest

from broker.connection import sync_client
from broker.messages import GenerateRequest, SamplingParams
from gpu_worker.io import CancelListener, Doorbells
from scheduler import keys as qkeys
from scheduler.queue import FairQueue
from scheduler.settings import SchedulerSettings

MODELS = ("m", "c")
"""Their hash tags fall in different thirds of the slot space: different primaries."""


def req(i, model):
    return GenerateRequest(id=f"{model}-r{i}", model=model, prompt_token_ids=[1] * 5,
                           params=SamplingParams(max_tokens=5), reply_to=qkeys.reply_channel(model, "api"), user="u")


@pytest.fixture
def fq(cluster_target):
    client = sync_client(cluster_target)
    yield FairQueue(client, SchedulerSettings(lease_s=5, max_attempts=2))
    client.close()


def test_two_models_on_two_primaries_each_keeps_its_keys_on_its_own(fq, redis_cluster):
    homes = {m: redis_cluster.primary_of(qkeys.state(m)) for m in MODELS}
    assert len(set(homes.values())) == 2
    for model in MODELS:
        for i in range(4):
            assert fq.enqueue(req(i, model), now=100.0).admitted
        claimed = [c.request.id for c in fq.claim_batch(model, "w", 3, now=100.0).claimed]
        assert claimed == [f"{model}-r{i}" for i in range(3)]
        assert fq.extend_leases(model, "w", claimed, now=101.0) == []
        fq.kv_index(model, "w", [("put", "s", "sess", 10)], ttl_s=30, now=101.0)
        assert fq.complete(model, "w", claimed[0])
        assert fq.cancel(model, claimed[1]) == "running"
        assert fq.cancel(model, f"{model}-r3") == "dequeued"
        assert fq.reap(model, now=200.0) == ([f"{model}-r2"], [])  # r1 was cancelled: dropped
        assert fq.depth(model)["normal"] == 1
    for model, home in homes.items():  # everything a script wrote is on the model's primary
        written = redis_cluster.nodes[home].client().keys(f"{qkeys.tag(model)}:*")
        assert qkeys.state(model) in written and qkeys.kv_session(model, "sess") in written
        slots = {redis_cluster.keyslot(k) for k in written}
        assert slots == {redis_cluster.keyslot(qkeys.state(model))}


def test_an_idle_worker_wakes_for_either_model(fq):
    """One BLPOP cannot span both models' doorbells on a Cluster (two slots): the
    worker waits on each model's own, and a ring on either wakes it."""
    bells = Doorbells(fq, "w", threading.Event())
    assert not bells.wait(MODELS, timeout=0.3)  # nothing rang
    for model in MODELS:
        timer = threading.Timer(0.2, fq.enqueue, args=(req(9, model),))
        timer.start()
        assert bells.wait(MODELS, timeout=30), f"no wake-up for {model}"
        timer.join()


def test_cancellations_reach_the_workers_of_either_model(fq, cluster_target):
    class Engine:
        def __init__(self):
            self.aborted = threading.Event()

        def abort(self, rid):
            self.aborted.set()

    engines = {m: Engine() for m in MODELS}
    stopping = threading.Event()
    listener = CancelListener(sync_client(cluster_target), engines, stopping)
    listener.start()
    try:
        for model in MODELS:
            fq.enqueue(req(1, model))
            fq.claim_batch(model, "w", 1)
        for model in MODELS:
            # the listener may still be subscribing: announce again until it hears one
            for _ in range(100):
                assert fq.cancel(model, f"{model}-r1") == "running"
                if engines[model].aborted.wait(0.2):
                    break
            assert engines[model].aborted.is_set(), f"the cancel of {model}'s request never arrived"
    finally:
        stopping.set()
        listener.join(5)


def test_the_relay_follows_its_channel_to_the_new_primary(redis_cluster, cluster_target):
    """A graceful failover moves the slot of a model's reply channel: the server ends
    the subscription on the old primary (no error, just an unsubscribe). The relay
    notices, wakes its readers (they refill from the logs) and subscribes again on the
    new primary, where events published afterwards reach it."""
    import asyncio

    from api.relay import TokenRelay
    from broker import messages
    from broker.messages import TokenEvent

    async def run():
        relay = TokenRelay(cluster_target, "api-1", list(MODELS))
        await relay.start()
        q = relay.register("r1")
        channel = relay.channel_for(MODELS[0])
        publisher = sync_client(cluster_target)
        try:
            def send(start):
                return publisher.spublish(channel, messages.encode_batch([TokenEvent("r1", 0, start, [start])]))

            send(0)
            assert (await asyncio.wait_for(q.get(), 10)).start == 0
            await asyncio.to_thread(redis_cluster.failover, redis_cluster.primary_of(channel))
            got = []
            for start in range(1, 200):  # until the relay listens on the new primary
                send(start)
                try:
                    got.append(await asyncio.wait_for(q.get(), 0.2))
                except TimeoutError:
                    continue
                if got[-1] is not None:
                    break
            assert None in got, "the readers were not told that events may have been missed"
            assert got[-1] is not None and got[-1].start > 0
            assert relay.reconnects >= 1
        finally:
            publisher.close()
            await relay.stop()

    asyncio.run(run())


def test_a_workers_round_trips_reach_the_replica_that_took_over_a_killed_primary(fq, redis_cluster, cluster_target):
    """The worker's publisher sends round trips (both models' events and the lifecycle
    stream: several nodes) while a killed primary's replica is still being elected
    (they fail), and on once the replica serves: every event gets there, none is lost.
    (A redis-py Cluster pipeline can go on sending to the dead primary unless the slot
    map is read again: the publisher does after each failed round trip.)"""
    import time

    from broker import messages
    from broker.messages import TokenEvent
    from gpu_worker.engine import Outgoing
    from gpu_worker.io import Publisher
    from metrics.lifecycle import Claim

    claimed = []
    for model in MODELS:
        fq.enqueue(req(1, model))
        claimed += fq.claim_batch(model, "w", 1).claimed
    publisher = Publisher(sync_client(cluster_target), FairQueue(sync_client(cluster_target), SchedulerSettings(
        lease_s=120)), "w", on_lost=lambda *_: None)
    publisher.start()
    victim = redis_cluster.primary_of(qkeys.state(MODELS[1]))
    heir = redis_cluster.replica_of(victim)

    def send(start):
        publisher.submit([Claim(c.request.model, c, 1, time.time()) for c in claimed] + [
            Outgoing(c.request.model, c.request.reply_to, c.request.id,
                     TokenEvent(c.request.id, 0, start, [start], f"t{start}")) for c in claimed])

    def logged(c) -> set[int]:  # (a round trip cut short and sent again may repeat one: readers drop it)
        node = redis_cluster.nodes[redis_cluster.primary_of(qkeys.state(c.request.model))].client()
        try:
            return {messages.decode(x).start for x in node.lrange(qkeys.output_log(c.request.model, c.request.id),
                                                                   0, -1)}
        finally:
            node.close()

    def wait(what, check):
        deadline = time.monotonic() + 30
        while not check():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    try:
        send(0)
        wait("the first events", lambda: all(logged(c) == {0} for c in claimed))
        heir_client = redis_cluster.nodes[heir].client()
        heir_client.execute_command("READONLY")
        victim_log = qkeys.output_log(MODELS[1], f"{MODELS[1]}-r1")
        wait("them to reach the replica", lambda: heir_client.llen(victim_log) == 1)
        heir_client.close()
        redis_cluster.nodes[victim].kill()  # no waiting: round trips land mid-election
        for start in range(1, 40):
            send(start)
            time.sleep(0.1)
            if heir in redis_cluster.primaries() and not publisher.outage.down and start > 5:
                break
        wait("every event to reach the primaries", lambda: all(logged(c) == set(range(start + 1)) for c in claimed))
    finally:
        publisher.stop()
        publisher.join(5)
        redis_cluster.heal()
