import pytest

from tests.stack import Stack
from tests.tiny import registry_toml


@pytest.fixture
def tiny_registry(tmp_path, tiny_model_dir):
    return registry_toml(tmp_path / "models.toml", tiny_model_dir)


@pytest.fixture
def tiny_stack(redis_url, tiny_registry, tmp_path):
    stack = Stack(redis_url, tiny_registry, tmp_path / "cache")
    yield stack
    stack.stop()
