from __future__ import annotations

import pytest
import redis

from inferstack.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    """A clean database on the session's real redis-server."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def rclient(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tests.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    from tests.tiny_media import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_kokoro_dir(tmp_path_factory):
    from tests.tiny_media import build_tiny_kokoro

    return build_tiny_kokoro(tmp_path_factory.mktemp("tiny-kokoro"))


@pytest.fixture(scope="session")
def tiny_qwen_vl_dir(tmp_path_factory):
    from tests.tiny_media import build_tiny_qwen_vl

    return build_tiny_qwen_vl(tmp_path_factory.mktemp("tiny-qwen-vl"))


@pytest.fixture(scope="session")
def tiny_cogvideox_dir(tmp_path_factory):
    from tests.tiny_media import build_tiny_cogvideox

    return build_tiny_cogvideox(tmp_path_factory.mktemp("tiny-cogvideox"))


@pytest.fixture
def one_thread():
    """Two ranks share this machine's cores: one torch thread each, as the supervisor sets."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
