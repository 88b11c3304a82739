"""A tensor-parallel worker group: N processes (``INFERSTACK_TP_SIZE``), one per device,
serving one text model. Rank 0 is an ordinary worker (claims from Redis, plans each
step, samples, publishes) whose engine runs the model sharded over the group; ranks
1..N-1 only load their shard and replay rank 0's steps (``gpu_worker.text.tp``). The
host supervisor (``inferstack.host``) starts the ranks and takes the whole group down
when one of them dies."""

from __future__ import annotations

import logging

import torch

from gpu_worker.settings import WorkerSettings
from gpu_worker.text.tp import GroupLost, TpGroup, TpRank, follow
from inferstack import modelstore
from inferstack.registry import Modality, ModelSpec, Registry

log = logging.getLogger(__name__)


def group_model(settings: WorkerSettings, registry: Registry) -> ModelSpec:
    """The one text model a group serves (``INFERSTACK_WORKER_MODELS``)."""
    names = settings.model_names
    if len(names) != 1:
        raise SystemExit(f"a tensor-parallel group serves one model; INFERSTACK_WORKER_MODELS names {names}")
    spec = registry.get(names[0])
    if spec is None:
        raise SystemExit(f"unknown model {names[0]!r}; registry {settings.models_file} has {registry.names()}")
    if spec.modality is not Modality.TEXT:
        raise SystemExit(f"{spec.name} is a {spec.modality} model; tensor parallelism runs text models")
    return spec


def join(settings: WorkerSettings, device: torch.device) -> TpGroup:
    """Meet the other ranks (blocks until all have joined, up to the timeout)."""
    return TpGroup(TpRank(settings.tp_rank, settings.tp_size), settings.tp_master, device, settings.tp_timeout_s)


def run_follower(settings: WorkerSettings, registry: Registry, device: torch.device) -> int:
    """A rank > 0: load this rank's shard, then replay rank 0's steps until it stops the
    group (exit 0) or is lost (exit 1, so the supervisor restarts the group)."""
    from gpu_worker.text.engine import make_runner
    from gpu_worker.worker import engine_dtype

    spec = group_model(settings, registry)
    group = join(settings, device)
    try:
        runner = make_runner(spec, modelstore.resolve(spec, settings.cache_dir), device=device,
                             dtype=engine_dtype(spec, settings, device), max_seqs=settings.max_batch,
                             kv_cache_bytes=settings.kv_cache_bytes, tp=group.tp, **settings.runner_options)
        log.info("rank %d/%d of %s ready on %s", group.rank, settings.tp_size, spec.name, device)
        follow(runner, group)
        return 0
    except GroupLost as exc:
        log.error("%s; leaving the group", exc)
        return 1
    finally:
        group.close()
