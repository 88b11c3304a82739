"""Tensor parallelism for the text engine: one model over N ranks (processes, one per
device) under torch.distributed, NCCL between GPUs and gloo on CPU.

Sharding (``shard_model``), Megatron-style for Llama-family decoders (Llama, Mistral,
Qwen2, Qwen3): rank r takes a contiguous range of KV heads together with the query
heads that attend to them, so ``q/k/v_proj`` keep those output rows and ``o_proj``
those input columns; the MLP's intermediate dimension is split the same way
(``gate/up_proj`` rows, ``down_proj`` columns). The outputs of ``o_proj`` and
``down_proj`` are partial sums, all-reduced by a forward hook. Embeddings, norms
(Qwen3's per-head ``q_norm``/``k_norm`` too) and ``lm_head`` stay whole on every rank.
Heads need not divide evenly (SmolLM2-135M has 3 KV heads: 2 + 1 over two ranks):
attention infers the local head count from the projection's width, and the ratio of
query to KV heads is the same on every rank. Each rank's KV cache holds its own heads.

Driving (rank 0 leads): the text engine runs unchanged on rank 0 with a
``LeaderRunner`` in place of its ``ModelRunner``. Every operation that changes the
state of the model's KV cache (``MIRRORED_RUNNER_OPS``, ``MIRRORED_CACHE_OPS``) runs
locally and is recorded; the record goes to the other ranks in one broadcast just
before each forward pass, and ``follow`` replays it there in the same order, so every
rank's paged cache holds the same block tables and positions for its own heads. Everything else
(claiming, planning, sampling, detokenizing, stop handling, Redis) exists only on
rank 0. The DRAM session/prefix store keeps its entries and accounting on rank 0;
each follower keeps its own shard of every entry under the same key
(``save_kv``/``restore_kv``/``drop_kv``).

Failure: any collective that fails or waits longer than the group's timeout raises
``GroupLost``; a follower then exits, and rank 0's worker hands its requests back to
the queue and exits, so the host supervisor restarts the whole group. While rank 0
is idle it sends a keepalive every quarter of the timeout, so an idle follower can
tell a quiet leader from a dead or hung one.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from gpu_worker.engine import FatalEngineError
from gpu_worker.text.kvcache import MUTATING

log = logging.getLogger(__name__)

MIRRORED_RUNNER_OPS = ("forward", "save_kv", "restore_kv", "drop_kv")
"""``ModelRunner`` methods that rank 0 mirrors to the other ranks (in call order)."""

MIRRORED_CACHE_OPS = MUTATING
"""Paged KV cache methods that change its block tables; rank 0 mirrors them. Read-only
ones (``can_open``, ``nbytes``, ``bytes_per_token``) answer from rank 0's cache. A new
way to change the cache adds its method to ``kvcache.MUTATING``."""

STOP = "stop"
KEEPALIVE = "keepalive"

LOAD_TIMEOUT_S = 1800.0
"""How long ranks wait for each other to load their shards (a 14B model from a slow
disk takes minutes); a rank that dies meanwhile makes the supervisor stop the rest."""


class GroupLost(FatalEngineError):
    """A rank of the group died, hung past the timeout, or the group broke: nobody can
    take another step."""


@dataclass(frozen=True, slots=True)
class TpRank:
    rank: int
    world: int


def split(n: int, world: int) -> list[int]:
    """``n`` units over ``world`` ranks, contiguous, the first ranks taking one more."""
    base, extra = divmod(n, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def _range(n: int, rank: int, world: int) -> tuple[int, int]:
    counts = split(n, world)
    return sum(counts[:rank]), counts[rank]


# -- sharding --------------------------------------------------------------------


def _keep_rows(linear: torch.nn.Linear, start: int, n: int) -> None:
    linear.weight = torch.nn.Parameter(linear.weight.data[start:start + n].clone(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = torch.nn.Parameter(linear.bias.data[start:start + n].clone(), requires_grad=False)
    linear.out_features = n


def _keep_cols(linear: torch.nn.Linear, start: int, n: int, *, keep_bias: bool) -> None:
    linear.weight = torch.nn.Parameter(linear.weight.data[:, start:start + n].clone(), requires_grad=False)
    if linear.bias is not None and not keep_bias:  # the sum over ranks adds the bias once
        linear.bias = None
    linear.in_features = n


def shard_model(model: torch.nn.Module, tp: TpRank, group=None) -> int:
    """Keep this rank's part of every decoder layer (see the module docstring) and make
    the layer outputs whole again with all-reduce hooks. Returns this rank's KV heads."""
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if tp.world > kv_heads:
        raise ValueError(f"tensor_parallel={tp.world} exceeds the model's {kv_heads} KV heads: "
                         "every rank needs at least one")
    group_size = heads // kv_heads
    kv0, kvn = _range(kv_heads, tp.rank, tp.world)
    q0, qn = kv0 * group_size, kvn * group_size
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise NotImplementedError(f"{type(model).__name__}: tensor parallelism needs a decoder with model.layers")

    def all_reduce(_module, _inputs, out):
        dist.all_reduce(out, group=group)
        return out

    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        needed = [(attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (mlp, ("gate_proj", "up_proj", "down_proj"))]
        if any(m is None or not all(isinstance(getattr(m, n, None), torch.nn.Linear) for n in names)
               for m, names in needed):
            raise NotImplementedError(
                f"{type(model).__name__}: tensor parallelism supports Llama-style decoders (self_attn.q/k/v/o_proj, "
                "mlp.gate/up/down_proj)")
        _keep_rows(attn.q_proj, q0 * head_dim, qn * head_dim)
        _keep_rows(attn.k_proj, kv0 * head_dim, kvn * head_dim)
        _keep_rows(attn.v_proj, kv0 * head_dim, kvn * head_dim)
        _keep_cols(attn.o_proj, q0 * head_dim, qn * head_dim, keep_bias=tp.rank == 0)
        attn.o_proj.register_forward_hook(all_reduce)
        i0, i_n = _range(mlp.gate_proj.out_features, tp.rank, tp.world)
        _keep_rows(mlp.gate_proj, i0, i_n)
        _keep_rows(mlp.up_proj, i0, i_n)
        _keep_cols(mlp.down_proj, i0, i_n, keep_bias=tp.rank == 0)
        mlp.down_proj.register_forward_hook(all_reduce)
    return kvn


# -- the group -------------------------------------------------------------------


class TpGroup:
    """This process's membership in a group: the model's process group (NCCL on CUDA,
    gloo on CPU) and a gloo group for plans, so plans never queue behind GPU work."""

    def __init__(self, tp: TpRank, master: str, device: torch.device, timeout_s: float):
        self.tp = tp
        self.timeout_s = timeout_s
        host, port = master.rsplit(":", 1)
        backend = "nccl" if device.type == "cuda" else "gloo"
        log.info("rank %d/%d joining the tensor-parallel group at %s (%s)", tp.rank, tp.world, master, backend)
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        # Ranks start together: meeting takes the collective timeout; loading may take longer (``loaded``).
        self.store = dist.TCPStore(host, int(port), tp.world, tp.rank == 0, timedelta(seconds=timeout_s))
        dist.init_process_group(backend, store=self.store, rank=tp.rank, world_size=tp.world,
                                timeout=timedelta(seconds=timeout_s), **kwargs)
        self.model_group = dist.group.WORLD
        self.control = (dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
                        if backend != "gloo" else self.model_group)
        self._lock = threading.Lock()
        self.last_send = time.monotonic()

    @property
    def rank(self) -> int:
        return self.tp.rank

    def loaded(self) -> None:
        """This rank holds its shard: wait until every rank does (loads take different
        times; the collectives' timeout starts counting only after this)."""
        try:
            self.store.set(f"loaded/{self.rank}", "1")
            self.store.wait([f"loaded/{r}" for r in range(self.tp.world)], timedelta(seconds=LOAD_TIMEOUT_S))
        except Exception as exc:  # noqa: BLE001 - rank 0 (which holds the store) died, or a rank never loaded
            raise GroupLost(f"the group did not finish loading: {exc}") from exc

    def send(self, ops: list) -> None:
        """Rank 0: one broadcast of the ops recorded since the last one."""
        with self._lock:
            try:
                dist.broadcast_object_list([ops], src=0, group=self.control)
            except Exception as exc:  # noqa: BLE001 - gloo/NCCL raise RuntimeError or DistBackendError
                raise GroupLost(f"tensor-parallel group lost: {exc}") from exc
            self.last_send = time.monotonic()

    def recv(self) -> list:
        box = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=self.control)
        except Exception as exc:  # noqa: BLE001
            raise GroupLost(f"rank 0 is gone or silent past {self.timeout_s:.0f} s: {exc}") from exc
        return box[0]

    def close(self) -> None:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a broken group may refuse a clean teardown
            pass


# -- rank 0 ------------------------------------------------------------------------


class _Recorder:
    def __init__(self, group: TpGroup):
        self.group = group
        self.ops: list[tuple] = []
        self.lock = threading.Lock()
        self.lost: GroupLost | None = None
        """Set when a keepalive failed: the next forward raises at once instead of waiting."""

    def record(self, op: tuple) -> None:
        with self.lock:
            self.ops.append(op)

    def flush(self) -> None:
        with self.lock:
            if self.lost is not None:
                raise self.lost
            ops, self.ops = self.ops, []
            self.group.send(ops)  # under the lock: the keepalive thread sends nothing in between


class MirroredCache:
    """Rank 0's batch KV cache as the engine and planner see it: the mutating methods
    (``MIRRORED_CACHE_OPS``) are recorded for the followers, the rest is the cache's own."""

    def __init__(self, cache, recorder: _Recorder):
        self._cache, self._recorder = cache, recorder

    def __getattr__(self, name: str):
        attr = getattr(self._cache, name)
        if name not in MIRRORED_CACHE_OPS:
            return attr

        def mirrored(*args):
            self._recorder.record(("cache", name, args))
            return attr(*args)
        return mirrored


class LeaderRunner:
    """Rank 0's runner: a ``ModelRunner`` whose state-changing calls are mirrored to the
    other ranks; ``forward`` first ships everything recorded (one broadcast), then runs.
    A keepalive thread speaks for an idle leader."""

    def __init__(self, runner, group: TpGroup):
        self._runner, self.group = runner, group
        group.loaded()
        self._recorder = _Recorder(group)
        self.cache = MirroredCache(runner.cache, self._recorder)
        self._closed = threading.Event()
        self._keepalive = threading.Thread(target=self._keep_alive, name="tp-keepalive", daemon=True)
        self._keepalive.start()

    def __getattr__(self, name: str):  # model, config, context_length, device, ...
        return getattr(self._runner, name)

    def forward(self, *args, **kwargs):
        self._recorder.record(("runner", "forward", args))
        self._recorder.flush()
        try:
            return self._runner.forward(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the followers ran (or wait in) the same step
            raise GroupLost(f"tensor-parallel forward pass failed: {type(exc).__name__}: {exc}") from exc

    def save_kv(self, key: str, slot: int, length: int):
        self._recorder.record(("runner", "save_kv", (key, slot, length)))
        return self._runner.save_kv(key, slot, length)

    def restore_kv(self, key: str, slot: int, layers, length: int) -> None:
        self._recorder.record(("runner", "restore_kv", (key, slot, None, length)))
        self._runner.restore_kv(key, slot, layers, length)

    def drop_kv(self, key: str) -> None:
        self._recorder.record(("runner", "drop_kv", (key,)))

    def _keep_alive(self) -> None:
        period = self.group.timeout_s / 4
        while not self._closed.wait(min(period, 1.0)):
            if time.monotonic() - self.group.last_send < period:
                continue
            try:
                with self._recorder.lock:  # pending ops wait for the next forward; this says "alive"
                    self.group.send([(KEEPALIVE,)])
            except GroupLost as exc:
                log.error("%s (while idle); the next step stops this worker", exc)
                self._recorder.lost = exc
                return

    def close(self) -> None:
        """Stop the followers (they exit) and leave the group."""
        self._closed.set()
        try:
            with self._recorder.lock:
                self.group.send([(STOP,)])
        except GroupLost:
            pass
        self.group.close()


# -- ranks 1..N-1 --------------------------------------------------------------------


class FollowerRunner:
    """A follower's side of ``MIRRORED_RUNNER_OPS``: forward passes without logits, and
    its own shard of every DRAM store entry, keyed like rank 0's store."""

    def __init__(self, runner):
        self.runner = runner
        self.cache = runner.cache
        self.shards: dict[str, list] = {}

    def forward(self, slots, chunks, starts, _logit_rows=None):
        self.runner.forward(slots, chunks, starts, logits=False)

    def save_kv(self, key: str, slot: int, length: int) -> None:
        self.shards[key] = [(k.cpu(), v.cpu()) for k, v in self.runner.save_kv(key, slot, length)]

    def restore_kv(self, key: str, slot: int, _layers, length: int) -> None:
        self.runner.restore_kv(key, slot, self.shards[key], length)

    def drop_kv(self, key: str) -> None:
        self.shards.pop(key, None)


def follow(runner, group: TpGroup) -> None:
    """Replay rank 0's plans until it says stop; ``GroupLost`` when it dies or hangs."""
    group.loaded()
    follower = FollowerRunner(runner)
    targets = {"runner": follower, "cache": runner.cache}
    steps = 0
    while True:
        for op in group.recv():
            if op[0] == STOP:
                log.info("rank %d: rank 0 stopped the group after %d forward passes", group.rank, steps)
                return
            if op[0] == KEEPALIVE:
                continue
            where, name, args = op
            try:
                getattr(targets[where], name)(*args)
            except Exception as exc:  # noqa: BLE001 - out of step with rank 0: the group cannot go on
                raise GroupLost(f"rank {group.rank} failed to replay {name}: {type(exc).__name__}: {exc}") from exc
            steps += name == "forward"
