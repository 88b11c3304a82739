"""The model manager: load on demand, LRU eviction under a memory budget, never evict
a busy model, one load per model however many ask."""

from __future__ import annotations

import threading

import pytest

from gpu_worker.manager import GiB, MemoryProbe, ModelManager, ModelState, NotEnoughMemory
from inferstack.registry import Registry


class StubEngine:
    """Stands in for a model: the manager only asks whether it has work."""

    def __init__(self, name: str):
        self.model = name
        self.busy = False
        self.closed = False

    def has_work(self) -> bool:
        return self.busy

    def request_ids(self) -> list[str]:
        return ["r1"] if self.busy else []

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def registry(tmp_path):
    path = tmp_path / "models.toml"
    path.write_text("".join(f'[models.{n}]\nmodality = "image"\nmemory_gb = 1.0\n' for n in "abcd")
                    + '[models.huge]\nmodality = "video"\nmemory_gb = 100000.0\n')
    return Registry.load(path)


@pytest.fixture
def built():
    return []


@pytest.fixture
def manager(registry, built):
    def build(spec):
        built.append(spec.name)
        return StubEngine(spec.name)

    m = ModelManager(registry, build, probe=MemoryProbe("cpu"), budget_bytes=int(2.5 * GiB))
    yield m
    m.stop()


def test_loads_on_demand_and_serves_only_ready_models(manager, built):
    assert list(manager) == [] and manager.state("a") is None
    engine = manager.load("a", timeout=10)
    assert engine.model == "a" and manager["a"] is engine
    assert list(manager) == ["a"] and manager.states() == {"a": "ready"}
    assert manager.load("a", timeout=10) is engine and built == ["a"]  # no second load


def test_evicts_least_recently_used_idle_model_when_space_is_needed(manager, built):
    a, b = manager.load("a", timeout=10), manager.load("b", timeout=10)
    manager.touch("a")  # a is now more recently used than b
    manager.load("c", timeout=10)
    assert sorted(manager) == ["a", "c"]
    assert b.closed and not a.closed
    assert manager.evictions == 1


def test_never_evicts_a_busy_model(manager):
    a = manager.load("a", timeout=10)
    b = manager.load("b", timeout=10)
    a.busy = True  # a is the least recently used, but has work in flight
    manager.load("c", timeout=10)
    assert sorted(manager) == ["a", "c"] and b.closed and not a.closed

    manager["c"].busy = True
    with pytest.raises(NotEnoughMemory, match="busy"):
        manager.load("d", timeout=10)
    assert sorted(manager) == ["a", "c"] and manager.state("d") is None


def test_a_pinned_model_is_not_evicted(manager):
    manager.load("a", timeout=10)
    manager.load("b", timeout=10)
    manager.touch("b")
    for name, _ in manager.items():  # iterating pins each engine (the claimer does this)
        if name == "a":
            manager.load("c", timeout=10)
    assert sorted(manager) == ["a", "c"]


def test_concurrent_requests_share_one_load(registry):
    release = threading.Event()
    calls = []

    def slow_build(spec):
        calls.append(spec.name)
        release.wait(10)
        return StubEngine(spec.name)

    m = ModelManager(registry, slow_build, probe=MemoryProbe("cpu"), budget_bytes=4 * GiB)
    try:
        futures = []
        threads = [threading.Thread(target=lambda: futures.append(m.request("a"))) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert m.state("a") is ModelState.LOADING and "a" not in m
        release.set()
        engines = {f.result(10) for f in futures}
        assert len(engines) == 1 and calls == ["a"]
        assert m.state("a") is ModelState.READY
    finally:
        release.set()
        m.stop()


def test_footprint_is_the_larger_of_estimate_and_measurement(manager):
    assert manager.estimate("a") == GiB
    manager.load("a", timeout=10)
    assert manager.free_bytes() <= int(1.5 * GiB)


def test_servable_excludes_models_that_could_never_fit(manager):
    assert manager.servable(lambda spec: True) == ["a", "b", "c", "d"]
    assert manager.servable(lambda spec: spec.name != "b") == ["a", "c", "d"]


def test_a_failed_load_reports_to_every_waiter_and_leaves_no_state(registry):
    def broken(spec):
        raise RuntimeError("weights are corrupt")

    m = ModelManager(registry, broken, probe=MemoryProbe("cpu"))
    try:
        f1, f2 = m.request("a"), m.request("a")
        assert f1 is f2
        with pytest.raises(RuntimeError, match="corrupt"):
            f1.result(10)
        assert m.state("a") is None
    finally:
        m.stop()


def test_the_loader_thread_ends_once_its_loads_are_done(manager):
    """A thread that ran torch kernels slows the compute loop while it lives, so the
    loader must not linger; a later load starts a fresh one."""
    import time

    manager.load("a", timeout=10)
    deadline = time.monotonic() + 5
    while manager._loader is not None:  # noqa: SLF001 - the property under test
        assert time.monotonic() < deadline, "the loader thread is still alive"
        time.sleep(0.05)
    assert manager.load("b", timeout=10).model == "b"
