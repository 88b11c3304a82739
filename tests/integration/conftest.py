import pytest
import torch

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


@pytest.fixture(scope="module")
def engine_factory(tiny_model_dir):
    """Text engines on the tiny model in float64, where only a real bug can flip an argmax."""
    from gpu_worker.text.engine import TextEngine
    from inferstack.registry import Modality, ModelSpec

    def make(device: str = "cpu", **kw):
        spec = ModelSpec(name="tiny", modality=Modality.TEXT, path=str(tiny_model_dir))
        return TextEngine(spec, tiny_model_dir, device=torch.device(device), dtype=torch.float64, **kw)
    return make
