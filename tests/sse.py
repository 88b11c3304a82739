"""Reading server-sent events in tests: each event's ``id:`` and data, and the text
of a chat or completion stream."""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx


@dataclass
class Event:
    id: str | None
    data: str

    @property
    def json(self) -> dict | None:
        return None if self.data == "[DONE]" else json.loads(self.data)


def read_events(lines, limit: int | None = None, into: list[Event] | None = None) -> list[Event]:
    """Events from SSE lines (comments and pings skipped); stop after ``limit``.
    ``into``: append to this list as they come (another thread watches it grow)."""
    events, current = ([] if into is None else into), None
    for line in lines:
        if line.startswith("id: "):
            current = line[4:]
        elif line.startswith("data: "):
            events.append(Event(current, line[6:]))
            current = None
            if limit is not None and len(events) >= limit:
                break
    return events


def stream(method: str, url: str, *, limit: int | None = None, timeout: float = 120, **kw) -> list[Event]:
    """One streamed response's events; with ``limit``, hang up after that many."""
    with httpx.stream(method, url, timeout=timeout, **kw) as r:
        assert r.status_code == 200, r.read()
        return read_events(r.iter_lines(), limit)


def texts(events: list[Event]) -> dict[int, str]:
    """Text per choice index (chat deltas or completion text)."""
    out: dict[int, str] = {}
    for e in events:
        body = e.json
        for c in (body or {}).get("choices", []):
            piece = (c["delta"].get("content") or "") if "delta" in c else c.get("text", "")
            out[c["index"]] = out.get(c["index"], "") + piece
    return out


def errors(events: list[Event]) -> list[dict]:
    return [e.json["error"] for e in events if e.json and "error" in e.json]
