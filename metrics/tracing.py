"""OpenTelemetry traces across API -> queue -> worker -> tokens.

The API opens a ``inferstack.request`` span per generation with an ``admit`` child
around the enqueue, and writes its W3C trace context into ``GenerateRequest.trace``
before the request is queued. The worker reads it back from the claimed request and
records ``queue_wait``, ``prefill``, ``decode`` and ``publish`` as children of that
span, with the times it observed, so one trace shows where a request's time went.

Off (every call a cheap no-op) unless an endpoint is configured:
``INFERSTACK_OTLP_ENDPOINT`` (a collector's base URL, e.g. ``http://otel:4318``) or the
standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``;
spans go out over OTLP/HTTP. ``OTEL_SDK_DISABLED=true`` turns it off.
"""

from __future__ import annotations

import atexit
import logging
import os
from contextlib import contextmanager
from urllib.parse import urlparse

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

_propagator = TraceContextTextMapPropagator()
_tracer: trace.Tracer | None = None


def enabled() -> bool:
    return _tracer is not None


def use_provider(provider) -> None:
    """Trace through ``provider`` (an SDK TracerProvider), or stop tracing (None)."""
    global _tracer
    _tracer = provider.get_tracer("inferstack") if provider is not None else None


def setup(service_name: str, endpoint: str | None = None) -> bool:
    """Export this process's spans over OTLP/HTTP when an endpoint is configured."""
    env_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true" or not (endpoint or env_endpoint):
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    url = None
    if endpoint:  # a base URL like OTEL_EXPORTER_OTLP_ENDPOINT: add the traces path
        url = endpoint if urlparse(endpoint).path.rstrip("/") else endpoint.rstrip("/") + "/v1/traces"
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    use_provider(provider)
    atexit.register(provider.shutdown)
    log.info("tracing: exporting %s spans over OTLP to %s", service_name, url or env_endpoint)
    return True


# -- API side -------------------------------------------------------------------


class RequestSpan:
    """The API's span of one generation; its context travels inside the request."""

    def __init__(self, request_id: str, model: str, user: str, tier: str, carrier: dict[str, str] | None):
        """``carrier`` None: no span (a resumed stream; its request's span is the first reader's)."""
        self.span = None
        if _tracer is None or carrier is None:
            return
        self.span = _tracer.start_span("inferstack.request", kind=SpanKind.SERVER, attributes={
            "inferstack.request_id": request_id, "inferstack.model": model, "inferstack.user": user,
            "inferstack.tier": tier})
        _propagator.inject(carrier, context=trace.set_span_in_context(self.span))

    @contextmanager
    def admit(self):
        if self.span is None:
            yield
            return
        ctx = trace.set_span_in_context(self.span)
        with _tracer.start_as_current_span("admit", context=ctx):
            yield

    def end(self, status: str, error: str = "", **attributes) -> None:
        if self.span is None:
            return
        self.span.set_attribute("inferstack.status", status)
        for key, value in attributes.items():
            self.span.set_attribute(f"inferstack.{key}", value)
        if status == "failed":
            self.span.set_status(Status(StatusCode.ERROR, error))
        self.span.end()
        self.span = None


# -- worker side ----------------------------------------------------------------


def record_spans(carrier: dict[str, str], spans: list[tuple[str, float, float, dict]]) -> None:
    """Record finished spans ``(name, start unix s, end unix s, attributes)`` as
    children of the span whose context ``carrier`` holds (the API's request span)."""
    if _tracer is None or not carrier:
        return
    ctx = _propagator.extract(carrier)
    for name, start, end, attributes in spans:
        span = _tracer.start_span(name, context=ctx, start_time=int(start * 1e9), attributes=attributes)
        span.end(end_time=int(max(start, end) * 1e9))
