"""Which models one worker holds: load on demand, place by memory, evict the least
recently used idle model when a new one needs the room.

Memory accounting: each model costs ``max(registry estimate, measured footprint)``.
The registry estimate (``memory_gb``) includes working memory (activations, KV
cache, latents) that a measurement right after loading cannot see; the measured
footprint (CUDA allocation delta, or RSS delta on CPU) wins when the registry
underestimates. Room = free device memory (``torch.cuda.mem_get_info`` on GPU,
available host RAM on CPU) minus a reserve, capped by an optional budget.

Concurrency: loads run one at a time on the loader thread, so two placements never
count the same free memory twice; a second request for a model that is already
loading gets the same future (coalescing). Iterating ``items()``/``values()`` pins
each engine for the body of the loop, so the claimer, the compute loop and the
heartbeat never hold an engine that is being unloaded, and eviction never picks a
model that has work in flight or a caller in the middle of claiming for it.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import StrEnum

from inferstack.registry import ModelSpec, Registry

log = logging.getLogger(__name__)

GiB = 1 << 30


class ModelState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"


class NotEnoughMemory(RuntimeError):
    """The model does not fit even after evicting every idle model."""


@dataclass
class _Slot:
    spec: ModelSpec
    state: ModelState
    future: Future
    engine: object = None
    footprint: int = 0
    """Bytes this model is accounted for while loading or loaded."""
    last_used: float = 0.0
    pins: int = 0
    loading_since: float = field(default_factory=time.time)


class MemoryProbe:
    """Free memory and the current footprint of this process on one device."""

    def __init__(self, device):
        import torch

        self.device = torch.device(device)

    def free_bytes(self) -> int:
        if self.device.type == "cuda":
            import torch

            return int(torch.cuda.mem_get_info(self.device)[0])
        import psutil

        return int(psutil.virtual_memory().available)

    def total_bytes(self) -> int:
        if self.device.type == "cuda":
            import torch

            return int(torch.cuda.mem_get_info(self.device)[1])
        import psutil

        return int(psutil.virtual_memory().total)

    def used_bytes(self) -> int:
        """What a load adds to: CUDA allocations on GPU, resident memory on CPU."""
        if self.device.type == "cuda":
            import torch

            return int(torch.cuda.memory_allocated(self.device))
        import psutil

        return int(psutil.Process().memory_info().rss)

    def release(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()


def is_busy(engine) -> bool:
    """An engine has work in flight (queued inside it, running, or leased to it)."""
    has_work = getattr(engine, "has_work", None)
    request_ids = getattr(engine, "request_ids", None)
    return bool((has_work and has_work()) or (request_ids and request_ids()))


class ModelManager(Mapping):
    """A read-only mapping of the *ready* engines (name -> engine), plus loading,
    eviction and the state the heartbeat advertises."""

    def __init__(self, registry: Registry, build: Callable[[ModelSpec], object], *, probe: MemoryProbe,
                 budget_bytes: int | None = None, reserve_bytes: int = 0, serves: set[str] | None = None,
                 shards: int = 1):
        self.registry = registry
        self.shards = shards
        """This worker leads a tensor-parallel group of ``shards`` devices: a model costs
        this device its share of the registry estimate."""
        self._build = build
        self.probe = probe
        self.budget = budget_bytes
        self.reserve = reserve_bytes
        self.serves = serves
        """Models this worker may load (None = any registry model); see ``servable``."""
        self._slots: dict[str, _Slot] = {}
        self._measured: dict[str, int] = {}
        self._lock = threading.RLock()
        self._jobs: queue.Queue = queue.Queue()
        self._loader: threading.Thread | None = None
        self.loads = 0
        self.evictions = 0

    # -- the mapping of ready engines ------------------------------------------

    def __getitem__(self, name: str):
        with self._lock:
            slot = self._slots.get(name)
            if slot is None or slot.state is not ModelState.READY:
                raise KeyError(name)
            return slot.engine

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter([n for n, s in self._slots.items() if s.state is ModelState.READY])

    def __len__(self) -> int:
        with self._lock:
            return sum(s.state is ModelState.READY for s in self._slots.values())

    def items(self):  # type: ignore[override]
        """(name, engine) of every ready model, each pinned while the loop body runs."""
        for name in list(self):
            engine = self.pin(name)
            if engine is None:
                continue
            try:
                yield name, engine
            finally:
                self.unpin(name)

    def values(self):  # type: ignore[override]
        for _, engine in self.items():
            yield engine

    # -- pins and use ------------------------------------------------------------

    def pin(self, name: str):
        """Hold a ready engine against eviction; returns None if it is not ready."""
        with self._lock:
            slot = self._slots.get(name)
            if slot is None or slot.state is not ModelState.READY:
                return None
            slot.pins += 1
            slot.last_used = time.monotonic()
            return slot.engine

    def unpin(self, name: str) -> None:
        with self._lock:
            slot = self._slots.get(name)
            if slot is not None and slot.pins > 0:
                slot.pins -= 1

    def touch(self, name: str) -> None:
        """Mark a model as used now (LRU order)."""
        with self._lock:
            slot = self._slots.get(name)
            if slot is not None:
                slot.last_used = time.monotonic()

    # -- what the heartbeat advertises --------------------------------------------

    def state(self, name: str) -> ModelState | None:
        with self._lock:
            slot = self._slots.get(name)
            return slot.state if slot else None

    def states(self) -> dict[str, str]:
        with self._lock:
            return {n: str(s.state) for n, s in self._slots.items()}

    def estimate(self, name: str) -> int:
        """Bytes a model is expected to need: max(registry estimate, last measured footprint)."""
        spec = self.registry[name]
        return max(int(spec.memory_gb * GiB) // self.shards, self._measured.get(name, 0))

    def capacity_bytes(self) -> int:
        """The most this worker could ever give to models."""
        total = self.probe.total_bytes() - self.reserve
        return total if self.budget is None else min(total, self.budget)

    def free_bytes(self) -> int:
        """Room for another model right now, without evicting anything."""
        with self._lock:
            accounted = sum(s.footprint for s in self._slots.values())
        room = self.probe.free_bytes() - self.reserve
        if self.budget is not None:
            room = min(room, self.budget - accounted)
        return max(0, room)

    def reclaimable_bytes(self) -> int:
        """Room right now plus what evicting every idle model would free."""
        with self._lock:
            idle = sum(s.footprint for s in self._slots.values() if self._evictable(s))
        return self.free_bytes() + idle

    def servable(self, available: Callable[[ModelSpec], bool]) -> list[str]:
        """Models this worker could load: allowed here, weights present (``available``), and
        small enough for its capacity. What the API checks before queueing for a model
        that no worker has loaded."""
        capacity = self.capacity_bytes()
        out = []
        for spec in self.registry:
            if self.serves is not None and spec.name not in self.serves:
                continue
            if self.estimate(spec.name) <= capacity and available(spec):
                out.append(spec.name)
        return out

    # -- loading -------------------------------------------------------------------

    def request(self, name: str) -> Future:
        """Make ``name`` ready: a future resolving to its engine. Concurrent requests for
        the same model share one load."""
        if name not in self.registry:
            raise KeyError(f"unknown model {name!r}")
        with self._lock:
            slot = self._slots.get(name)
            if slot is not None and slot.state is not ModelState.UNLOADING:
                slot.last_used = time.monotonic()
                return slot.future
            future: Future = Future()
            self._slots[name] = _Slot(self.registry[name], ModelState.LOADING, future, last_used=time.monotonic())
        self._jobs.put(name)
        self._ensure_loader()
        return future

    def _ensure_loader(self) -> None:
        # The loader thread lives only while loads are queued. A thread that has run
        # torch's parallel kernels keeps its OpenMP team, and while it lives the compute
        # loop's matrix products ran 1.8x slower on a 2-core CPU (measured here).
        with self._lock:
            if self._loader is None or not self._loader.is_alive():
                self._loader = threading.Thread(target=self._load_loop, name="model-loader", daemon=True)
                self._loader.start()

    def load(self, name: str, timeout: float | None = None):
        return self.request(name).result(timeout)

    def add_loaded(self, name: str, engine, footprint: int | None = None) -> None:
        """Adopt an engine built elsewhere (tests, tools)."""
        future: Future = Future()
        future.set_result(engine)
        with self._lock:
            self._slots[name] = _Slot(self.registry[name], ModelState.READY, future, engine,
                                      footprint if footprint is not None else self.estimate(name),
                                      last_used=time.monotonic())

    def _load_loop(self) -> None:
        while True:
            try:
                name = self._jobs.get(timeout=0.5)
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():  # exit; the next request starts a fresh loader
                        self._loader = None
                        return
                continue
            if name is None:
                return
            with self._lock:
                slot = self._slots.get(name)
            if slot is None or slot.state is not ModelState.LOADING or slot.future.done():
                continue
            try:
                engine = self._load(slot)
            except BaseException as exc:  # noqa: BLE001 - reported to every waiter
                log.error("%s: load failed: %s", name, exc)
                with self._lock:
                    if self._slots.get(name) is slot:
                        del self._slots[name]
                slot.future.set_exception(exc)
                continue
            slot.future.set_result(engine)

    def _load(self, slot: _Slot):
        name = slot.spec.name
        need = self.estimate(name)
        self._make_room(name, need)
        with self._lock:
            slot.footprint = need
        log.info("%s: loading (needs %.2f GiB, %.2f GiB free)", name, need / GiB, self.probe.free_bytes() / GiB)
        started = time.monotonic()
        before = self.probe.used_bytes()
        engine = self._build(slot.spec)
        measured = max(0, self.probe.used_bytes() - before)
        self._measured[name] = max(self._measured.get(name, 0), measured)
        with self._lock:
            slot.engine = engine
            slot.footprint = max(need, measured)
            slot.state = ModelState.READY
            slot.last_used = time.monotonic()
        self.loads += 1
        log.info("%s: ready in %.1f s (measured %.0f MiB, accounted %.2f GiB)", name, time.monotonic() - started,
                 measured / (1 << 20), slot.footprint / GiB)
        return engine

    def _evictable(self, slot: _Slot) -> bool:
        return slot.state is ModelState.READY and slot.pins == 0 and not is_busy(slot.engine)

    def _make_room(self, name: str, need: int) -> None:
        """Evict least recently used idle models until ``need`` bytes fit."""
        room = self.free_bytes()
        while room < need:
            with self._lock:
                idle = sorted((s for n, s in self._slots.items() if n != name and self._evictable(s)),
                              key=lambda s: s.last_used)
                if not idle:
                    break
                victim = idle[0]
                victim.state = ModelState.UNLOADING  # gone from the ready view: nobody can pin it now
            room += victim.footprint
            self._unload(victim)
        if room < need:
            busy = [n for n, s in self._slots.items() if n != name]
            raise NotEnoughMemory(
                f"{name} needs {need / GiB:.2f} GiB; {room / GiB:.2f} GiB free after evicting every idle model"
                + (f" (busy: {', '.join(busy)})" if busy else ""))

    def unload(self, name: str) -> bool:
        """Unload an idle model now; False if it is busy or not ready."""
        with self._lock:
            slot = self._slots.get(name)
            if slot is None or not self._evictable(slot):
                return False
            slot.state = ModelState.UNLOADING
        self._unload(slot)
        return True

    def _unload(self, slot: _Slot) -> None:
        name = slot.spec.name
        log.info("%s: unloading (idle; least recently used)", name)
        close = getattr(slot.engine, "close", None)
        if close:
            try:
                close()
            except Exception:  # noqa: BLE001 - the memory is released regardless
                log.exception("%s: close failed", name)
        slot.engine = None
        with self._lock:
            if self._slots.get(name) is slot:
                del self._slots[name]
        self.probe.release()
        self.evictions += 1

    def stop(self) -> None:
        self._jobs.put(None)

    def close(self) -> None:
        """The worker is exiting: let every engine release what it holds (a
        tensor-parallel leader stops its followers)."""
        with self._lock:
            engines = [s.engine for s in self._slots.values() if s.engine is not None]
        for engine in engines:
            close = getattr(engine, "close", None)
            if close:
                try:
                    close()
                except Exception:  # noqa: BLE001 - exiting anyway
                    log.exception("closing %s failed", getattr(engine, "model", engine))
