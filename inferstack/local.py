"""``inferstack up``: the whole stack on one machine — a private Redis (unless
REDIS_URL is set), the API, the host supervisor with one worker per device
(``inferstack.host``) and the metrics exporter (on chDB in the cache directory unless
INFERSTACK_CLICKHOUSE_URL is set) — with Ctrl-C stopping all of it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from gpu_worker.settings import WorkerSettings
from inferstack import modelstore
from inferstack.procs import spawn_owned
from inferstack.redis_server import free_port
from inferstack.registry import Registry
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


def _wait_ready(url: str, procs: dict[str, subprocess.Popen], timeout_s: float = 300) -> bool:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        for name, p in procs.items():
            if p.poll() is not None:
                say(f"{name} exited with code {p.returncode}; see its log above")
                return False
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
    redis_server = None
    if not (env.get("REDIS_URL") or env.get("INFERSTACK_REDIS_URL")):
        from inferstack.redis_server import RedisServer

        redis_server = RedisServer()
        env["INFERSTACK_REDIS_URL"] = redis_server.url
        say(f"started redis-server on port {redis_server.port}")
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
    procs: dict[str, subprocess.Popen] = {}
    code = 0
    try:
        procs["api"] = spawn_owned([sys.executable, "-m", "inferstack.cli", "api"], env=env)
        # the host supervisor: one worker per device (INFERSTACK_HOST_DEVICES), switchable to a
        # tensor-parallel group through the admin API (inferstack.host)
        procs["host"] = spawn_owned([sys.executable, "-m", "inferstack.cli", "host"],
                                      env={**env, "INFERSTACK_METRICS_PORT": str(worker_metrics_port)})
        procs["exporter"] = spawn_owned([sys.executable, "-m", "inferstack.cli", "exporter"],
                                        env={**env, "INFERSTACK_METRICS_PORT": str(exporter_metrics_port)})
        url = f"http://{env['INFERSTACK_HOST']}:{port}"
        if not _wait_ready(url, procs):
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
""", flush=True)
        while all(p.poll() is None for p in procs.values()):
            time.sleep(0.5)
        for name, p in procs.items():
            if p.poll() is not None:
                say(f"{name} exited with code {p.returncode}; stopping the rest")
                code = 1
    except KeyboardInterrupt:
        say("stopping ...")
    finally:
        # The children run in process groups of their own (a terminal's Ctrl-C reaches
        # only this launcher): stop them here, then Redis, which they all talk to.
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        if redis_server:
            redis_server.stop()
        say("stopped")
    return code
