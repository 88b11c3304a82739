from broker import messages
from broker.messages import GenerateRequest, SamplingParams
from metrics import tracing


def test_off_without_an_endpoint_and_nothing_travels(monkeypatch):
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    assert not tracing.setup("test") and not tracing.enabled()
    span = tracing.RequestSpan("r", "m", "u", "normal", carrier := {})
    assert carrier == {} and span.span is None
    span.end("finished")  # no-ops
    tracing.record_spans({}, [("decode", 1.0, 2.0, {})])


def test_the_carrier_survives_the_wire():
    req = GenerateRequest("r", "m", [1, 2], SamplingParams(), "is:reply:x",
                          trace={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
    assert messages.decode(messages.encode(req)).trace == req.trace


def test_a_preemption_shows_in_the_trace_and_the_events():
    """The run that gave way ends with a ``preempt`` span (and why); the claim that
    resumes it waited in a ``preempted`` span since then, not in ``queue_wait``."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from broker.messages import TokenEvent
    from metrics.lifecycle import Claim, WorkerRecorder
    from broker.messages import Claimed

    class Pipe:
        def __init__(self):
            self.events = []

        def xadd(self, key, fields, **kw):
            self.events.append(fields)

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    try:
        rec, pipe = WorkerRecorder("w1", 1000), Pipe()
        req = GenerateRequest("r", "m", [1, 2], SamplingParams(), "is:reply:x", created_at=100.0,
                              trace={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
        rec.claim(pipe, Claim("m", Claimed(req, 1), 4, 101.0))
        rec.token("m", TokenEvent("r", 0, 0, [5]), 102.0)
        rec.requeued(pipe, "m", "r", "preempted", "tier", 103.0)
        rec.round_trip(103.0, 103.1)
        rec.claim(pipe, Claim("m", Claimed(req, 2, preemptions=1, preempted_s=2.0, preempted_at=103.0), 4, 105.0))
        rec.token("m", TokenEvent("r", 0, 1, [6], finish_reason="length"), 106.0)
        rec.release(pipe, "m", "r", None, 106.5)
        rec.round_trip(106.5, 106.6)
        spans = [(s.name, s.start_time / 1e9, s.end_time / 1e9, dict(s.attributes))
                 for s in exporter.get_finished_spans()]
    finally:
        tracing.use_provider(None)
        provider.shutdown()
    names = [s[0] for s in spans]
    assert names == ["queue_wait", "prefill", "decode", "publish", "preempt",
                     "preempted", "prefill", "decode", "publish"]
    preempt, preempted = spans[4], spans[5]
    assert preempt[1] == preempt[2] == 103.0 and preempt[3]["inferstack.reason"] == "tier"
    assert (preempted[1], preempted[2]) == (103.0, 105.0) and preempted[3]["inferstack.preemptions"] == 1
    kinds = [(e["kind"], e.get("preemptions"), e.get("attempt"), e.get("preempted_ms")) for e in pipe.events]
    assert kinds == [("claimed", None, "1", None), ("preempted", "1", None, None), ("claimed", "1", "1", "2000"),
                     ("released", None, None, None)]
