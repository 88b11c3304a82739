"""How a streamed chat completion ended, for tests that break things under streams:
``done`` (``[DONE]`` after the choice finished), ``error`` (an error event, or an
OpenAI-shaped error response once admitted: the deadline passed before it started),
``refused`` (429: never admitted), ``hung`` (the client gave up waiting) or ``cut``
(the stream stopped with neither: what must never happen)."""

from __future__ import annotations

import json
import threading

import httpx

from tests.sse import errors, read_events


def chat(url: str, model: str, max_tokens: int, out: dict, started: threading.Event | None = None, *,
         timeout: float = 120, headers: dict | None = None, **body) -> str:
    """Stream one chat completion into ``out`` (``events`` grows as they come, so
    another thread can watch; then ``end``, ``tokens``); returns how it ended."""
    events = out.setdefault("events", [])
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Hello world!"}], **body}
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=timeout, headers=headers) as r:
            out["status"] = r.status_code
            if r.status_code != 200:
                out["body"] = json.loads(r.read())
                out["end"] = "refused" if r.status_code == 429 else "error"
                assert set(out["body"]["error"]) >= {"message", "type", "param", "code"}, out["body"]
                return out["end"]
            for line in r.iter_lines():
                read_events([line], into=events)
                if started is not None and events:
                    started.set()
    except httpx.TimeoutException:
        out["end"] = "hung"
        return out["end"]
    except httpx.TransportError as exc:  # the server went away mid-stream
        out["end"], out["error"] = "cut", repr(exc)
        return out["end"]
    finished = [c for e in events if e.json for c in e.json.get("choices", []) if c.get("finish_reason")]
    if errors(events):
        out["end"] = "error"
    elif events and events[-1].data == "[DONE]" and finished:
        out["end"] = "done"
        out["tokens"] = sum(1 for e in events if e.json and e.json.get("choices")
                            and e.json["choices"][0]["delta"].get("content") is not None)
    else:
        out["end"] = "cut"
    return out["end"]
