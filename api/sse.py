"""The one way this API answers with Server-Sent Events."""

from __future__ import annotations

from sse_starlette import EventSourceResponse

PING_S = 15.0
"""Seconds between keepalives on an idle stream (proxies close silent connections)."""

KEEPALIVE = b": keepalive\n"
"""A comment line with no blank line after it. A blank line would end an event that
has no data; a client that keeps the last event id across events (the SSE spec says
to, and the official openai SDK does) then hands that empty event on, and the SDK
fails parsing it as JSON: a stream that waited 15 s anywhere after its first event
would break every SDK client."""


def event_stream(content, *, ping_s: float = PING_S) -> EventSourceResponse:
    return EventSourceResponse(content, ping=ping_s, sep="\n", ping_message_factory=lambda: KEEPALIVE)
