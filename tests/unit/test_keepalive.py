"""A long text stream's keep-alive pings, read by the official openai SDK's SSE decoder:
no ping may turn into an event (the SDK parses every event's data as JSON)."""

from openai._streaming import SSEDecoder
from sse_starlette import ServerSentEvent

from api.routes._text import DONE, KeepAlive, sse_data


def events(wire: bytes) -> list:
    return list(SSEDecoder().iter_bytes(iter([wire])))


def test_a_keep_alive_between_identified_events_is_no_event():
    wire = sse_data({"a": 1}, "1") + KeepAlive().encode() + sse_data({"a": 2}, "2") + KeepAlive().encode() + DONE
    got = events(wire)
    assert [e.data for e in got] == ['{"a":1}', '{"a":2}', "[DONE]"]
    assert [e.id for e in got] == ["1", "2", "done"]


def test_the_default_ping_would_be_an_empty_event_after_an_id():
    """Why the ping is not sse-starlette's own: a comment with a blank line after it is
    dispatched by the SDK as an event with empty data once an id has been seen."""
    wire = sse_data({"a": 1}, "1") + ServerSentEvent(comment="ping", sep="\n").encode() + DONE
    assert [e.data for e in events(wire)] == ['{"a":1}', "", "[DONE]"]
