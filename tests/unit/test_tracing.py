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
