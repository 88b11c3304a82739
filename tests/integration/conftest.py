import pytest

from tests.stack import Stack
from tests.tiny import registry_toml, two_models_toml


@pytest.fixture
def tiny_registry(tmp_path, tiny_model_dir):
    return registry_toml(tmp_path / "models.toml", tiny_model_dir)


@pytest.fixture
def two_models(tmp_path, tiny_model_dir):
    """A registry of the tiny model under two names on different Cluster primaries
    (``tests.tiny.TWO_SLOTS``)."""
    return two_models_toml(tmp_path / "two-models.toml", tiny_model_dir)


@pytest.fixture
def tiny_stack(redis_url, tiny_registry, tmp_path):
    stack = Stack(redis_url, tiny_registry, tmp_path / "cache")
    yield stack
    stack.stop()
