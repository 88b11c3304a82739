"""The API's trace context travels inside the queued request, through Redis, to the
worker, whose spans join the API's trace."""

import threading
import time

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from broker import messages
from metrics import tracing
from scheduler import keys as qkeys


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    yield exporter
    tracing.use_provider(None)
    provider.shutdown()


def test_worker_spans_join_the_api_trace_through_redis(spans, tiny_stack, rclient):
    worker = tiny_stack.workers[0].worker
    worker.claimer.paused.set()  # hold the request in the queue to look at what travels
    reply = {}
    client = threading.Thread(target=lambda: reply.update(r=httpx.post(
        f"{tiny_stack.url}/v1/chat/completions", timeout=30, json={
            "model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5, "ignore_eos": True})))
    client.start()
    deadline = time.monotonic() + 10
    while not (queued := list(rclient.scan_iter(match=f"{qkeys.tag('tiny')}:req:*"))):
        assert time.monotonic() < deadline, "the request never reached the queue"
        time.sleep(0.02)
    payload = messages.decode(rclient.hget(queued[0], "payload"))
    worker.claimer.paused.clear()
    client.join(30)
    assert reply["r"].status_code == 200

    traceparent = payload.trace["traceparent"]
    deadline = time.monotonic() + 10
    while "publish" not in {s.name for s in spans.get_finished_spans()}:
        assert time.monotonic() < deadline, [s.name for s in spans.get_finished_spans()]
        time.sleep(0.05)
    by_name = {s.name: s for s in spans.get_finished_spans()}
    request = by_name["inferstack.request"]
    assert traceparent.startswith(f"00-{request.context.trace_id:032x}-{request.context.span_id:016x}-")
    assert request.attributes["inferstack.status"] == "finished"
    assert by_name["admit"].parent.span_id == request.context.span_id
    for name in ("queue_wait", "prefill", "decode", "publish"):
        span = by_name[name]
        assert span.context.trace_id == request.context.trace_id, name
        assert span.parent.span_id == request.context.span_id, name
        assert span.attributes["inferstack.worker"] == worker.id
        assert span.end_time >= span.start_time
    assert by_name["queue_wait"].end_time <= by_name["prefill"].start_time + 1
    assert by_name["decode"].attributes["inferstack.completion_tokens"] == 5

