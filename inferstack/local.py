"""``inferstack up``: the whole stack on one machine — a private Redis (unless
REDIS_URL is set; append-only, so a restart keeps its data), the API, the host
supervisor with one worker per device (``inferstack.host``) and the metrics exporter
(on chDB in the cache directory unless INFERSTACK_CLICKHOUSE_URL is set) — each
restarted when it dies (``inferstack.supervisor``), with Ctrl-C stopping all of it."""

from __future__ import annotations

import os
import signal
import sys
import time

import httpx

from gpu_worker.settings import WorkerSettings
from inferstack import modelstore
from inferstack.procs import spawn_owned
from inferstack.redis_server import free_port
from inferstack.registry import Registry
from inferstack.supervisor import Child, GiveUp, Supervisor
from metrics.settings import StoreSettings


def say(msg: str) -> None:
    print(f"[inferstack] {msg}", flush=True)


def prepare(names: list[str] | None = None) -> list[str]:
    """Make the models' weights loadable now (converting once); returns the ready ones."""
    settings = WorkerSettings()
    registry = Registry.load(settings.models_file)
    names = names or settings.model_names
    ready = []
    for name in names:
        spec = registry.get(name)
        if spec is None:
            say(f"unknown model {name!r} (registry: {', '.join(registry.names())})")
            continue
        try:
            path = modelstore.resolve(spec, settings.cache_dir)
            say(f"{name}: ready at {path}")
            ready.append(name)
        except modelstore.ModelUnavailable as exc:
            say(f"skipping {exc}")
    return ready


def report_registry() -> list[str]:
    """Say, for every registry model, whether this host can serve it (loaded at start or
    on demand) or why not; returns the servable names."""
    from gpu_worker.worker import missing_packages

    settings = WorkerSettings()
    registry = Registry.load(settings.models_file)
    allowed = settings.serve_names
    servable = []
    for spec in registry:
        if allowed is not None and spec.name not in allowed:
            say(f"{spec.name}: not served by this worker (INFERSTACK_WORKER_SERVES)")
            continue
        missing = missing_packages(spec)
        if missing:
            say(f"skipping {spec.name} ({spec.modality}): Python packages missing: {', '.join(missing)}")
            continue
        if spec.device == "cuda" and not _has_cuda():
            say(f"skipping {spec.name} ({spec.modality}): needs a GPU (device = \"cuda\" in the registry)")
            continue
        if not modelstore.available(spec, settings.cache_dir):
            try:
                modelstore.resolve(spec, settings.cache_dir, convert=False)
            except modelstore.ModelUnavailable as exc:
                say(f"skipping {spec.modality} model {exc}")
            continue
        if spec.tensor_parallel > 1:
            say(f"{spec.name} ({spec.modality}): available as a tensor-parallel group of {spec.tensor_parallel} "
                f"devices: `inferstack mode {settings.host_id} tp --model {spec.name}` switches this host to it")
            continue
        when = "loaded at start" if spec.name in settings.model_names else "loaded on first request"
        say(f"{spec.name} ({spec.modality}): available, {when}")
        servable.append(spec.name)
    return servable


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _wait_ready(url: str, supervisor: Supervisor, timeout_s: float = 300) -> bool:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        supervisor.check()  # a child that dies while starting is restarted (or raises GiveUp)
        try:
            # with a keys file /ready needs a key: the admin key passes
            admin = os.environ.get("INFERSTACK_ADMIN_KEY")
            r = httpx.get(f"{url}/ready", timeout=2, headers={"Authorization": f"Bearer {admin}"} if admin else {})
            if r.status_code == 200:
                return True
            if r.status_code == 401:
                say("the API is up; /ready needs a key with INFERSTACK_KEYS_FILE set (set INFERSTACK_ADMIN_KEY too "
                    "and this waits for a worker)")
                return True
            reason = r.json().get("reason", "")
        except httpx.HTTPError:
            reason = "API starting"
        if reason != last:
            say(f"waiting: {reason} ...")
            last = reason
        time.sleep(0.5)
    say("the stack did not become ready in time")
    return False


def _interrupt(*_):
    raise KeyboardInterrupt


def run_local(port: int | None = None) -> int:
    port = port or int(os.environ.get("PORT") or os.environ.get("INFERSTACK_PORT") or 8000)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the stack as cleanly as Ctrl-C
    signal.signal(signal.SIGINT, _interrupt)  # even when started with SIGINT ignored (`&`)
    env = dict(os.environ)
    supervisor = Supervisor(say=lambda msg: say(msg))
    redis_server = None
    if not (env.get("REDIS_URL") or env.get("INFERSTACK_REDIS_URL")):
        from inferstack.redis_server import RedisServer

        # Append-only, so that a Redis restarted by the supervisor comes back with the queue.
        redis_server = RedisServer(appendonly=True)
        env["INFERSTACK_REDIS_URL"] = redis_server.url
        say(f"started redis-server on port {redis_server.port} (append-only file in {redis_server.dir})")
    else:
        say(f"using Redis at {env.get('INFERSTACK_REDIS_URL') or env.get('REDIS_URL')}")

    models = prepare()
    report_registry()
    if not models:
        say("no model is available on this host; nothing to serve")
        if redis_server:
            redis_server.stop()
        return 1
    env["INFERSTACK_WORKER_MODELS"] = ",".join(models)
    env["INFERSTACK_PORT"] = str(port)
    env.setdefault("INFERSTACK_HOST", "127.0.0.1")
    worker_metrics_port = int(env.get("INFERSTACK_METRICS_PORT") or free_port())
    exporter_metrics_port = free_port()
    store = StoreSettings()
    metrics_at = store.clickhouse_url.split("@")[-1] if store.clickhouse_url else f"chDB in {store.chdb_dir}"

    def command(what: str, **extra: str):
        return lambda: spawn_owned([sys.executable, "-m", "inferstack.cli", what], env={**env, **extra})

    def start_redis():
        try:
            redis_server.start()  # on the same port and directory: it loads its append-only file
        except RuntimeError:
            pass  # it died again: the supervisor sees the exit code and backs off
        return redis_server.proc

    code = 0
    try:
        if redis_server:
            supervisor.children["redis"] = Child("redis", start_redis, proc=redis_server.proc)
        supervisor.add("api", command("api"))
        # the host supervisor: one worker per device (INFERSTACK_HOST_DEVICES), switchable to a
        # tensor-parallel group through the admin API (inferstack.host); it restarts its own workers
        supervisor.add("host", command("host", INFERSTACK_METRICS_PORT=str(worker_metrics_port)))
        supervisor.add("exporter", command("exporter", INFERSTACK_METRICS_PORT=str(exporter_metrics_port)))
        url = f"http://{env['INFERSTACK_HOST']}:{port}"
        if not _wait_ready(url, supervisor):
            return 1
        model = models[0]
        print(f"""
Inference Stack is up at {url}  (Ctrl-C stops everything)

  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}'

  OpenAI SDK: OpenAI(base_url="{url}/v1", api_key="unused")

  Metrics: {url}/metrics (API), http://127.0.0.1:{worker_metrics_port}/metrics (worker),
  http://127.0.0.1:{exporter_metrics_port}/metrics (exporter: queue depth);
  request rows: {metrics_at}; `inferstack stats` or {url}/v1/stats
  A process that dies is restarted; one that keeps dying stops the stack.
""", flush=True)
        while True:
            supervisor.check()
            time.sleep(0.5)
    except GiveUp as exc:
        say(str(exc))
        code = 1
    except KeyboardInterrupt:
        say("stopping ...")
    finally:
        # The children run in process groups of their own (a terminal's Ctrl-C reaches
        # only this launcher): stop them here, then Redis, which they all talk to.
        supervisor.stop(["api", "host", "exporter", "redis"],
                        stop={"redis": redis_server.stop} if redis_server else None)
        if redis_server and "redis" not in supervisor.children:
            redis_server.stop()
        say("stopped")
    return code
