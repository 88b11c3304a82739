"""What a route's Redis failure becomes: Redis away, restarting or failing over, in any
connection mode, is a 503 with Retry-After (clients retry), never a 500."""

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from redis.exceptions import ClusterDownError, ConnectionError, SlotNotCoveredError, TimeoutError, TryAgainError

from api import errors


@pytest.mark.parametrize("exc", [ConnectionError("gone"), TimeoutError("slow"), ClusterDownError("CLUSTERDOWN"),
                                 TryAgainError("TRYAGAIN"), SlotNotCoveredError("slot 7 not covered")],
                         ids=lambda e: type(e).__name__)
def test_redis_unavailable_in_any_mode_is_a_503_with_retry_after(exc):
    app = FastAPI()
    errors.install(app)

    @app.get("/x")
    async def route():
        raise exc

    r = TestClient(app, raise_server_exceptions=False).get("/x")
    assert r.status_code == 503 and r.headers["retry-after"] == "2"
    assert r.json()["error"]["code"] == "redis_unavailable"
