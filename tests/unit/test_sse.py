"""Keepalives on an idle stream must not turn into events a client parses."""

import asyncio

import httpx
from openai._streaming import SSEDecoder
from starlette.applications import Starlette
from starlette.routing import Route

from api.sse import event_stream


def test_keepalives_between_events_reach_the_openai_sdk_as_nothing():
    async def events():
        yield {"id": "1", "data": '{"n": 1}'}
        await asyncio.sleep(0.3)  # several keepalives go out here
        yield {"id": "2", "data": '{"n": 2}'}
        yield {"id": "done", "data": "[DONE]"}

    app = Starlette(routes=[Route("/", lambda request: event_stream(events(), ping_s=0.05))])

    async def get() -> bytes:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return (await client.get("/")).content

    body = asyncio.run(get())
    assert body.count(b": keepalive") >= 2
    # The official SDK's own decoder: a keepalive ending in a blank line would come out
    # as an event with empty data (the id carries over), which the SDK fails to parse.
    assert [(e.id, e.data) for e in SSEDecoder().iter_bytes(iter([body]))] == [
        ("1", '{"n": 1}'), ("2", '{"n": 2}'), ("done", "[DONE]")]
