"""The host supervisor's pure parts: what runs where in each mode, and which mode
changes a host can make."""

import pytest

from broker.messages import HostMode
from inferstack.host import ModeError, UnitSpec, check_mode, layout
from inferstack.registry import Registry


@pytest.fixture
def registry(tmp_path):
    path = tmp_path / "models.toml"
    path.write_text("""
[models.small]
modality = "text"
path = "/nowhere"

[models.big]
modality = "text"
path = "/nowhere"
tensor_parallel = 4

[models.img]
modality = "image"
path = "/nowhere"
""")
    return Registry.load(path)


def test_layouts():
    devices = ["cuda:0", "cuda:1", "cuda:2"]
    assert layout(devices, HostMode.INDIVIDUAL) == [
        UnitSpec("w0", ("cuda:0",)), UnitSpec("w1", ("cuda:1",)), UnitSpec("w2", ("cuda:2",))]
    assert layout(devices, HostMode.TP, "small", 2) == [
        UnitSpec("tp", ("cuda:0", "cuda:1"), "small"), UnitSpec("w2", ("cuda:2",))]
    # the device left over keeps its worker across a switch (same spec: not restarted)
    assert layout(devices, HostMode.INDIVIDUAL)[2] == layout(devices, HostMode.TP, "small", 2)[1]


def test_mode_checks(registry):
    two, four = ["cpu", "cpu"], [f"cuda:{i}" for i in range(4)]
    assert check_mode(registry, two, HostMode.INDIVIDUAL, None, None) == (None, 0)
    assert check_mode(registry, two, HostMode.TP, "small", None) == ("small", 2)
    assert check_mode(registry, four, HostMode.TP, "big", None) == ("big", 4)
    for devices, model, size, param, message in [
        (two, None, None, "model", "needs a model"),
        (two, "nope", None, "model", "unknown model"),
        (two, "img", None, "model", "runs text models"),
        (two, "small", 3, "size", "exceeds this host's 2 devices"),
        (two, "big", None, "size", "exceeds this host's 2 devices"),
        (four, "big", 2, "size", "big needs 4"),
    ]:
        with pytest.raises(ModeError, match=message) as err:
            check_mode(registry, devices, HostMode.TP, model, size)
        assert err.value.param == param
    with pytest.raises(ModeError, match="takes no model"):
        check_mode(registry, two, HostMode.INDIVIDUAL, "small", None)
