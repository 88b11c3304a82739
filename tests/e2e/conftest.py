"""The real stack as separate processes (API, worker) on the real SmolLM2-135M,
driven with the official openai SDK. One model load for the whole session."""

from __future__ import annotations

import pytest

from inferstack.redis_server import RedisServer
from loadtest.faults import Procs

pytestmark = pytest.mark.e2e


class ProcStack(Procs):
    """The stack as processes, with the tests' short heartbeat and lease."""

    def __init__(self, redis_url: str, extra_env: dict | None = None, workers: int = 1):
        super().__init__(redis_url, workers=workers, extra_env={"INFERSTACK_HEARTBEAT_S": "0.5",
                                                                "INFERSTACK_LEASE_S": "3", **(extra_env or {})})


@pytest.fixture(scope="package")
def stack():
    """Its own redis-server, so that tests elsewhere flushing theirs never see this
    stack's heartbeats; torn down when the e2e package is done."""
    server = RedisServer()
    s = ProcStack(server.url)
    yield s
    s.stop()
    server.stop()


@pytest.fixture(scope="package")
def client(stack):
    from openai import OpenAI

    # A generous timeout: on a shared, overloaded 2-core CI host a crowded batch's
    # request took over 120 s; how long is not what these tests check.
    return OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=300)
