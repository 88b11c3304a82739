"""``inferstack host``: the supervisor of one host's workers (``inferstack up`` runs it
too). It owns the host's devices and runs them in one of two modes:

* ``individual``: one worker per device, each loading models on its own;
* ``tp``: one tensor-parallel group of ``size`` devices serving one model
  (``gpu_worker.group``), and a worker on each device left over.

It restarts what dies, with a backoff: a worker, or a whole group when any of its
ranks dies (the others are stopped first; rank 0 hands its requests back to the
queue). It publishes its status to Redis (``keys.host``) every heartbeat and takes
mode changes from its command list (``keys.host_commands``), which the admin API
(``POST /v1/admin/hosts/{host}/mode``) and ``inferstack mode`` fill. Nobody logs in to
the host.

A mode change drains what changes: those workers stop claiming and get the drain
timeout to finish what they run; what is left goes back to the queue with its output
log, so it resumes elsewhere (or on the new workers) with no token lost or repeated.
Then the new units start; if one cannot start, the host goes back to the old layout
and the change is reported as failed.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import Field

from broker import keys, messages
from broker.connection import sync_client
from broker.messages import HostMode, ModeChange, encode_heartbeat
from inferstack.procs import spawn_owned
from inferstack.redis_server import free_port
from inferstack.registry import Modality, Registry
from inferstack.settings import CommonSettings

log = logging.getLogger(__name__)


class HostSettings(CommonSettings):
    host_id: str = Field(default_factory=socket.gethostname,
                         description="This host's name in the admin API (unique per supervisor).")
    host_devices: str = Field(
        "auto", description="Devices the supervisor runs workers on, comma-separated (cuda:0,cuda:1); auto = every "
        "GPU, or one CPU worker without GPUs. A CPU may be listed more than once (cpu,cpu): each worker then gets "
        "its share of the cores.")
    host_mode: HostMode = Field(HostMode.INDIVIDUAL, description="The mode at start: individual or tp.")
    host_tp_model: str = Field("", description="With host_mode=tp: the model of the tensor-parallel group.")
    host_tp_size: int = Field(0, description="With host_mode=tp: its devices (0 = the registry's tensor_parallel, "
                              "at least 2).")
    heartbeat_s: float = Field(1.0, description="How often the supervisor checks its workers and publishes its status.")
    heartbeat_ttl_s: float = Field(5.0, description="A supervisor silent this long is considered gone.")
    drain_timeout_s: float = Field(10.0, description="The workers' drain timeout (the same variable they read).")
    stop_grace_s: float = Field(15.0, description="After the drain timeout, how long a worker may take to exit "
                                "before it is killed.")
    start_timeout_s: float = Field(900.0, description="A worker or group not serving within this has failed (a mode "
                                   "change then goes back).")
    metrics_port: int = Field(0, description="Workers' Prometheus ports: the i-th unit gets this + i (0 = off).")


def host_devices(spec: str) -> list[str]:
    if spec.strip() != "auto":
        return [d.strip() for d in spec.split(",") if d.strip()]
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(n)] or ["cpu"]


@dataclass(frozen=True)
class UnitSpec:
    """What runs on some devices: one worker, or (``model`` set) a tensor-parallel group."""

    name: str
    devices: tuple[str, ...]
    model: str | None = None


def layout(devices: list[str], mode: HostMode, model: str | None = None, size: int = 0) -> list[UnitSpec]:
    if mode is HostMode.TP:
        return [UnitSpec("tp", tuple(devices[:size]), model)] + [
            UnitSpec(f"w{i}", (d,)) for i, d in enumerate(devices) if i >= size]
    return [UnitSpec(f"w{i}", (d,)) for i, d in enumerate(devices)]


class ModeError(ValueError):
    """A mode change this host cannot make; the message says why, ``param`` what."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def check_mode(registry: Registry, devices: list[str], mode: HostMode, model: str | None,
               size: int | None) -> tuple[str | None, int]:
    """Validate a mode change; returns (model, size) with defaults filled in. The admin
    API runs the same check against the host's advertised devices before queueing."""
    if mode is HostMode.INDIVIDUAL:
        if model or size:
            raise ModeError("mode individual takes no model or size", "model" if model else "size")
        return None, 0
    if not model:
        raise ModeError("mode tp needs a model", "model")
    spec = registry.get(model)
    if spec is None:
        raise ModeError(f"unknown model {model!r}", "model")
    if spec.modality is not Modality.TEXT:
        raise ModeError(f"{model} is a {spec.modality} model; tensor parallelism runs text models", "model")
    size = size or max(2, spec.tensor_parallel)
    if size < max(2, spec.tensor_parallel):
        raise ModeError(f"size {size}: a group has at least 2 devices, and {model} needs {spec.tensor_parallel}",
                        "size")
    if size > len(devices):
        raise ModeError(f"size {size} exceeds this host's {len(devices)} devices", "size")
    return model, size


@dataclass
class Unit:
    spec: UnitSpec
    index: int
    procs: list[subprocess.Popen] = field(default_factory=list)
    worker_id: str = ""
    state: str = "down"
    """starting -> ready; stopping -> down (-> starting again after the backoff)."""
    since: float = 0.0
    restart_at: float | None = None
    crashes: deque = field(default_factory=deque)
    restarts: int = 0
    last_exits: list[int | None] = field(default_factory=list)
    """Exit codes of the processes when the unit last went down (None: still running then)."""

    def alive(self) -> list[subprocess.Popen]:
        return [p for p in self.procs if p.poll() is None]

    def describe(self) -> dict:
        return {"name": self.spec.name, "kind": "tp" if self.spec.model else "worker", "model": self.spec.model,
                "devices": list(self.spec.devices), "worker_id": self.worker_id, "state": self.state,
                "pids": [p.pid for p in self.procs if p.poll() is None], "restarts": self.restarts,
                "last_exits": self.last_exits}


BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
"""Restart delays after consecutive crashes (crashes older than 2 minutes are forgotten)."""


class HostSupervisor:
    def __init__(self, settings: HostSettings | None = None, env: dict | None = None, client=None,
                 clock: Callable[[], float] = time.monotonic):
        self.s = settings or HostSettings()
        self.env = dict(os.environ if env is None else env)
        self.r = client or sync_client(self.s.redis_url)
        self.registry = Registry.load(self.s.models_file)
        self.devices = host_devices(self.s.host_devices)
        self.clock = clock
        model, size = check_mode(self.registry, self.devices, self.s.host_mode, self.s.host_tp_model or None,
                                 self.s.host_tp_size or None)
        self.mode, self.model, self.size = self.s.host_mode, model, size
        self.units: dict[str, Unit] = {}
        self.state = "starting"
        self.command: ModeChange | None = None
        self.command_state = ""
        self.error = ""
        self._ids = itertools.count()
        self._published = 0.0
        self.stop_event = threading.Event()

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        """Start the layout, then supervise and take mode changes until stopped."""
        log.info("host %s: devices %s, mode %s", self.s.host_id, ", ".join(self.devices), self.describe_mode())
        self._start(layout(self.devices, self.mode, self.model, self.size))
        try:
            while not self.stop_event.is_set():
                self.tick()
                if self.state == "starting" and all(u.state == "ready" for u in self.units.values()):
                    self.state = "ready"
                    self.publish()
                change = self._next_command()
                if change is not None:
                    self.apply(change)
        finally:
            self.state = "stopping"
            self.publish()
            self._stop(list(self.units.values()))
            try:
                self.r.zrem(keys.HOSTS, self.s.host_id)
                self.r.delete(keys.host(self.s.host_id))
            except Exception:  # noqa: BLE001 - Redis gone first: the status key expires
                pass
            log.info("host %s stopped", self.s.host_id)

    def stop(self) -> None:
        self.stop_event.set()

    def tick(self) -> None:
        """Restart what died (after its backoff), notice what became ready, publish."""
        now = self.clock()
        for unit in self.units.values():
            if unit.state in ("starting", "ready") and len(unit.alive()) < len(unit.procs):
                self._unit_died(unit, now)
            elif unit.state == "stopping" and not unit.alive():
                unit.state = "down"
            elif unit.state == "stopping" and now - unit.since > self.s.stop_grace_s:
                for p in unit.alive():
                    p.kill()
            elif unit.state == "down" and unit.restart_at is not None and now >= unit.restart_at:
                unit.restarts += 1
                self._spawn(unit)
            elif unit.state == "starting":
                if self._serving(unit):
                    unit.state = "ready"
                    log.info("host %s: %s ready (%s)", self.s.host_id, unit.spec.name, unit.worker_id)
                elif now - unit.since > self.s.start_timeout_s:
                    log.error("host %s: %s not serving after %.0f s; restarting it", self.s.host_id,
                              unit.spec.name, self.s.start_timeout_s)
                    self._unit_died(unit, now)
        if now - self._published >= self.s.heartbeat_s:
            self.publish()

    def _unit_died(self, unit: Unit, now: float) -> None:
        unit.last_exits = [p.poll() for p in unit.procs]
        # The rest of a group cannot go on without the dead rank: rank 0 notices it
        # (its collectives fail), hands its requests back and exits; stop them all.
        self._terminate(unit)
        unit.crashes.append(now)
        while unit.crashes and now - unit.crashes[0] > 120:
            unit.crashes.popleft()
        delay = BACKOFF_S[min(len(unit.crashes), len(BACKOFF_S)) - 1]
        unit.restart_at = now + delay
        codes = ", ".join("running" if c is None else str(c) for c in unit.last_exits)
        self.error = f"{unit.spec.name} ({', '.join(unit.spec.devices)}) went down (exit codes: {codes}); " \
                     f"restarting in {delay:.0f} s"
        log.error("host %s: %s", self.s.host_id, self.error)

    # -- mode changes ------------------------------------------------------------------

    def _next_command(self) -> ModeChange | None:
        try:
            got = self.r.blpop([keys.host_commands(self.s.host_id)], timeout=min(1.0, self.s.heartbeat_s))
        except Exception:  # noqa: BLE001 - Redis away: keep supervising, try again
            log.exception("host %s: reading commands failed", self.s.host_id)
            self.stop_event.wait(1.0)
            return None
        if not got:
            return None
        try:
            return messages.decode(got[1])
        except Exception:  # noqa: BLE001
            log.error("host %s: ignoring a malformed command %r", self.s.host_id, got[1])
            return None

    def apply(self, change: ModeChange) -> bool:
        """Switch to the mode ``change`` asks for; True when the host serves in it."""
        self.command, self.command_state, self.error = change, "running", ""
        try:
            model, size = check_mode(self.registry, self.devices, change.mode, change.model, change.size)
        except ModeError as exc:
            return self._finish(False, str(exc))
        target = layout(self.devices, change.mode, model, size)
        old = [u.spec for u in self.units.values()]
        if target == old:
            return self._finish(True, "")
        log.info("host %s: switching from %s to %s (%s)", self.s.host_id, self.describe_mode(),
                 change.mode if model is None else f"tp {model} x{size}", change.id)
        self.state = "switching"
        self.publish()
        self._switch(target)
        if self._wait_ready():
            self.mode, self.model, self.size = change.mode, model, size
            return self._finish(True, "")
        failure = self.error
        log.error("host %s: the new layout did not start (%s); going back", self.s.host_id, failure)
        self._switch(old)
        self._wait_ready()
        return self._finish(False, f"could not start the new layout: {failure}; the host went back to "
                                   f"{self.describe_mode()}")

    def _switch(self, target: list[UnitSpec]) -> None:
        keep = {u.spec for u in self.units.values()} & set(target)
        self._stop([u for u in self.units.values() if u.spec not in keep])
        units = {u.spec: u for u in self.units.values() if u.spec in keep}
        self.units = {}
        for i, spec in enumerate(target):
            unit = units.get(spec) or Unit(spec, i)
            self.units[spec.name] = unit
            if unit.state == "down":
                self._spawn(unit)

    def _wait_ready(self) -> bool:
        deadline = self.clock() + self.s.start_timeout_s
        while not self.stop_event.is_set() and self.clock() < deadline:
            self.tick()
            if all(u.state == "ready" for u in self.units.values()):
                return True
            if any(u.crashes for u in self.units.values() if u.state != "ready"):
                return False  # one died while starting: the error says how
            self.stop_event.wait(0.2)
        self.error = self.error or "not serving in time"
        return False

    def _finish(self, ok: bool, error: str) -> bool:
        self.state = "ready"
        self.command_state = "done" if ok else "failed"
        self.error = error
        if not ok:
            log.error("host %s: mode change %s failed: %s", self.s.host_id, self.command.id, error)
        else:
            log.info("host %s: now %s", self.s.host_id, self.describe_mode())
        self.publish()
        return ok

    def describe_mode(self) -> str:
        return f"tp {self.model} x{self.size}" if self.mode is HostMode.TP else "individual"

    # -- processes ---------------------------------------------------------------------

    def _start(self, specs: list[UnitSpec]) -> None:
        self.units = {}
        for i, spec in enumerate(specs):
            unit = Unit(spec, i)
            self.units[spec.name] = unit
            self._spawn(unit)

    def _spawn(self, unit: Unit) -> None:
        spec = unit.spec
        unit.worker_id = f"{self.s.host_id}-{spec.name}-{next(self._ids)}"
        base = {**self.env, "INFERSTACK_HOST_ID": self.s.host_id, "INFERSTACK_WORKER_ID": unit.worker_id,
                "INFERSTACK_METRICS_PORT": str(self.s.metrics_port + unit.index if self.s.metrics_port else 0)}
        if all(d == "cpu" for d in self.devices) and "INFERSTACK_TORCH_THREADS" not in self.env:
            # Workers (and ranks) on one CPU split its cores rather than fight over them.
            base["INFERSTACK_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(self.devices)))
        envs = []
        if spec.model is None:
            envs.append({**base, "INFERSTACK_DEVICE": spec.devices[0]})
        else:
            master = f"127.0.0.1:{free_port()}"
            for rank, device in enumerate(spec.devices):
                env = {**base, "INFERSTACK_DEVICE": device, "INFERSTACK_TP_SIZE": str(len(spec.devices)),
                       "INFERSTACK_TP_RANK": str(rank), "INFERSTACK_TP_MASTER": master,
                       "INFERSTACK_TP_DEVICES": ",".join(spec.devices), "INFERSTACK_WORKER_MODELS": spec.model,
                       "INFERSTACK_WORKER_SERVES": spec.model}
                if rank:
                    env.update(INFERSTACK_WORKER_ID=f"{unit.worker_id}-rank{rank}", INFERSTACK_METRICS_PORT="0")
                envs.append(env)
        unit.procs = [spawn_owned([sys.executable, "-m", "inferstack.cli", "worker"], env=env) for env in envs]
        unit.state, unit.since, unit.restart_at = "starting", self.clock(), None
        log.info("host %s: started %s on %s (%s, pids %s)", self.s.host_id, spec.name, ", ".join(spec.devices),
                 unit.worker_id, ", ".join(str(p.pid) for p in unit.procs))

    def _serving(self, unit: Unit) -> bool:
        """Rank 0 (or the worker) heartbeats: it has loaded what it loads at start."""
        try:
            beat = self.r.hget(keys.worker(unit.worker_id), "state")
        except Exception:  # noqa: BLE001
            return False
        return beat is not None and (beat.decode() if isinstance(beat, bytes) else beat) == "ready"

    def _terminate(self, unit: Unit) -> None:
        """Ask a unit to drain and stop: the worker (rank 0) first; a group's followers
        exit when rank 0 stops them, or at once if rank 0 is gone."""
        alive = unit.alive()
        if alive and unit.procs[0].poll() is None:
            unit.procs[0].send_signal(signal.SIGTERM)
        else:
            for p in alive:
                p.send_signal(signal.SIGTERM)
        unit.state, unit.since = ("stopping" if alive else "down"), self.clock()

    def _stop(self, units: list[Unit]) -> None:
        """Drain and stop units, waiting for them (killing stragglers)."""
        for unit in units:
            if unit.state != "down":
                self._terminate(unit)
            unit.restart_at = None
        deadline = self.clock() + self.s.drain_timeout_s + self.s.stop_grace_s
        while any(u.alive() for u in units):
            if self.clock() > deadline:
                for u in units:
                    for p in u.alive():
                        log.warning("host %s: killing pid %d of %s (did not stop)", self.s.host_id, p.pid,
                                    u.spec.name)
                        p.kill()
                break
            for u in units:  # rank 0 gone: its followers must not wait for it
                if u.procs and u.procs[0].poll() is not None:
                    for p in u.alive():
                        p.send_signal(signal.SIGTERM)
            self.publish_if_due()
            time.sleep(0.1)
        for u in units:
            for p in u.procs:
                p.wait()
            u.state = "down"

    # -- status ------------------------------------------------------------------------

    def status(self) -> dict:
        cmd = self.command
        return {
            "host_id": self.s.host_id, "hostname": socket.gethostname(), "pid": os.getpid(),
            "devices": self.devices, "mode": str(self.mode), "model": self.model or "", "size": self.size,
            "state": self.state, "units": [u.describe() for u in self.units.values()],
            "command": cmd.id if cmd else "", "command_state": self.command_state,
            "command_mode": str(cmd.mode) if cmd else "",
            "command_model": (cmd.model or "") if cmd and self.command_state == "running" else "",
            "error": self.error, "updated_at": time.time(),
        }

    def publish(self) -> None:
        self._published = self.clock()
        try:
            pipe = self.r.pipeline(transaction=False)
            pipe.delete(keys.host(self.s.host_id))
            pipe.hset(keys.host(self.s.host_id), mapping=encode_heartbeat(self.status()))
            pipe.pexpire(keys.host(self.s.host_id), int(self.s.heartbeat_ttl_s * 1000))
            pipe.zadd(keys.HOSTS, {self.s.host_id: time.time()})
            pipe.execute()
        except Exception:  # noqa: BLE001 - Redis away: the workers ride it out, so do we
            log.exception("host %s: publishing the status failed", self.s.host_id)

    def publish_if_due(self) -> None:
        if self.clock() - self._published >= self.s.heartbeat_s:
            self.publish()


def main(settings: HostSettings | None = None) -> None:
    logging.basicConfig(level=os.environ.get("INFERSTACK_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s host %(name)s: %(message)s")
    try:
        supervisor = HostSupervisor(settings)
    except ModeError as exc:
        raise SystemExit(f"INFERSTACK_HOST_MODE: {exc}") from None
    signal.signal(signal.SIGTERM, lambda *_: supervisor.stop())
    signal.signal(signal.SIGINT, lambda *_: supervisor.stop())
    supervisor.run()
