"""Driving a text engine step by step in tests, without Redis."""

from __future__ import annotations

from broker.messages import GenerateRequest
from scheduler.queue import Claimed


def run_schedule(engine, schedule: dict[int, list[GenerateRequest]], max_steps: int = 2000) -> dict:
    """schedule: step -> requests arriving before it. Returns request id -> its events
    as comparable tuples (choice, start, tokens, text, finish reason, cached tokens)."""
    events: dict[str, list[tuple]] = {}
    done: set[str] = set()

    def emit(batch):
        for o in batch:
            if o.event is not None:
                e = o.event
                events.setdefault(o.request_id, []).append(
                    (e.choice, e.start, tuple(e.token_ids), e.text, e.finish_reason, e.cached_tokens))
            if o.request_done:
                done.add(o.request_id)

    total = sum(len(v) for v in schedule.values())
    for step in range(max_steps):
        for req in schedule.get(step, []):
            engine.add(Claimed(req, 1), [])
        if engine.has_work():
            engine.step(emit)
        if len(done) == total:
            return events
    raise AssertionError("engine did not finish")
