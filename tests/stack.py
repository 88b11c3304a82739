"""Run the API (uvicorn in a thread) and workers (threads) in-process against a real
redis-server, for integration tests on the tiny model."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn

from api.app import create_app
from api.settings import ApiSettings
from gpu_worker.settings import WorkerSettings
from gpu_worker.worker import Worker, build_engine
from inferstack.redis_server import free_port
from inferstack.registry import Registry
from scheduler.settings import SchedulerSettings


class ApiThread:
    def __init__(self, settings: ApiSettings, sched: SchedulerSettings):
        self.url = f"http://127.0.0.1:{settings.port}"
        self.app = create_app(settings, sched)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=settings.port,
                                log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("API did not start")
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


class WorkerThread:
    def __init__(self, settings: WorkerSettings, sched: SchedulerSettings, registry: Registry, engines=None,
                 setup=None):
        device = torch.device("cpu")
        engines = engines or {name: build_engine(registry[name], settings, device) for name in settings.model_names}
        self.worker = Worker(settings, sched, engines, device)
        if setup is not None:
            setup(self.worker)  # before it runs: e.g. attach step observers
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()

    @property
    def engines(self):
        return self.worker.engines

    def stop(self):
        self.worker.request_stop()
        self.worker.request_stop()
        self.thread.join(10)


class Stack:
    def __init__(self, redis_url: str, models_file: Path, cache_dir: Path, *, sched: SchedulerSettings | None = None,
                 workers: int = 1, worker_kw: dict | None = None, api_kw: dict | None = None, key: str | None = None):
        """``key``: an API key of the keys file (``api_kw["keys_file"]``), for the
        stack's own probes (/ready needs one then)."""
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.sched = sched or SchedulerSettings(redis_url=redis_url, lease_s=3)
        self.registry = Registry.load(models_file)
        self.api_settings = ApiSettings(redis_url=redis_url, models_file=models_file, cache_dir=cache_dir,
                                        port=free_port(), **(api_kw or {}))
        self.api = ApiThread(self.api_settings, self.sched)
        self.worker_kw = {**dict(redis_url=redis_url, models_file=models_file, cache_dir=cache_dir,
                                 worker_models=",".join(self.registry.names()), heartbeat_s=0.2), **(worker_kw or {})}
        self.workers = [self.add_worker() for _ in range(workers)]
        self.url = self.api.url
        if workers:
            self.wait_ready()

    def add_worker(self, step_delay_s: float = 0.0, setup=None, **kw) -> WorkerThread:
        """``step_delay_s`` slows every forward pass of text engines, so tests can act
        mid-generation; ``setup(worker)`` runs before the worker starts."""
        settings = WorkerSettings(**{**self.worker_kw, **kw})
        device = torch.device("cpu")
        engines = {name: build_engine(self.registry[name], settings, device) for name in settings.model_names}
        if step_delay_s:
            for engine in engines.values():
                forward = engine.runner.forward

                def slow(*a, _forward=forward, **k):
                    time.sleep(step_delay_s)
                    return _forward(*a, **k)

                engine.runner.forward = slow
        return WorkerThread(settings, self.sched, self.registry, engines, setup=setup)

    def start_worker(self, setup=None, **kw) -> WorkerThread:
        """Add a worker after the stack started (e.g. once jobs are queued)."""
        worker = self.add_worker(setup=setup, **kw)
        self.workers.append(worker)
        self.wait_ready()
        return worker

    def wait_ready(self, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while httpx.get(f"{self.url}/ready", headers=self.headers).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("stack not ready")
            time.sleep(0.05)

    def stop(self):
        for w in self.workers:
            w.stop()
        self.api.stop()


def script_output(engine, text: str) -> int:
    """Make a text engine write ``text`` then its end token, whatever its logits (the
    tiny model cannot reason or call tools); detokenizer, grammar, wire and API stay
    real. Returns the script's length in tokens."""
    tokens = engine.tokenizer(text, add_special_tokens=False)["input_ids"] + [engine.tokenizer.eos_token_id]
    real = engine.sampler

    class Scripted:
        eos = real.eos

        def __call__(self, logits, seqs):
            return [tokens[len(s.output_ids)] for s in seqs], [None] * len(seqs), [0] * len(seqs)

    engine.sampler = Scripted()
    return len(tokens)
