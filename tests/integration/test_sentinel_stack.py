"""The stack on a Sentinel-managed Redis (a primary, its replica, one sentinel): it
finds the primary through the sentinel, streams, and keeps streaming when the
sentinel fails the primary over to the replica."""

import threading

from broker.connection import RedisMode, RedisTarget
from tests.stack import Stack
from tests.stream_outcome import chat


def test_streams_through_sentinel_and_across_its_failover(redis_sentinel, tiny_registry, tmp_path):
    redis_sentinel.flush()
    target = RedisTarget(redis_sentinel.url, RedisMode.SENTINEL, redis_sentinel.master)
    stack = Stack(target, tiny_registry, tmp_path / "cache", workers=0)
    stack.start_worker(step_delay_s=0.05)  # streams last a few seconds: the failover lands mid-stream
    try:
        assert chat(stack.url, "tiny", 8, {}) == "done"
        results = [{} for _ in range(4)]
        started = [threading.Event() for _ in results]
        threads = [threading.Thread(target=chat, args=(stack.url, "tiny", 60, r, ev))
                   for r, ev in zip(results, started)]
        for t in threads:
            t.start()
        for ev in started:
            assert ev.wait(60), "a stream never started"
        old = redis_sentinel.primary()
        assert redis_sentinel.failover() != old
        assert any(r["events"][-1].data != "[DONE]" for r in results), "every stream ended before the failover"
        for t in threads:
            t.join()
        assert [r["end"] for r in results] == ["done"] * 4, results  # a graceful failover loses nothing
        assert all(r["tokens"] == 60 for r in results)
        assert chat(stack.url, "tiny", 8, {}) == "done"  # and new requests go to the new primary
    finally:
        stack.stop()
