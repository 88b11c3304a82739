"""The text engine on a GPU, next to transformers' own continuous batching, on the
same random weights, in one process: output tokens/s, TTFT and TPOT per concurrency.

    python -m loadtest.gpu_bench --out gpu_bench.json            # on a CUDA host, < 8 min on one H100/H200
    python -m loadtest.gpu_bench --smoke --out /tmp/smoke.json   # tiny model on CPU (CI)

Self-contained by design, for a lent GPU machine with no model hub, no Redis, no API
and no package registry: each model (SmolLM2-135M, Qwen3-0.6B) is built with random
weights from its published configuration (written out below; speed does not depend
on weight values) and saved once to a temp dir, with a word-level tokenizer over its
whole vocabulary, so our ``TextEngine`` (driven in-process, as the worker's compute
loop drives it, with token ids in and token events out) and
``model.init_continuous_batching()`` load exactly the same checkpoint. It needs
torch, transformers and this repository's ``broker``, ``gpu_worker``, ``inferstack``
and ``scheduler`` (its Redis-free ``claimed`` and ``policy``) packages: nothing else (no redis, pydantic or psutil; orjson is
replaced by a stand-in when missing, since nothing here goes over the wire).

Each level runs closed loop: ``c`` clients each send a request (``--prompt-tokens``
random ids, greedy, exactly ``--output-tokens`` new tokens, EOS ignored) and send
their next one the moment it ends, ``--requests-per-client`` times. TTFT is from
submission to the first token, TPOT the mean gap between a request's later tokens,
and output tokens/s counts every generated token over the level's wall time. The
dtype is what the worker's ``auto`` picks (bf16 on GPUs). The anchor is vLLM's
published figure for Qwen3-0.6B on one H100 (vLLM 0.19, 512 in / 128 out): about
12.1k output tok/s at saturation, TPOT 2.4 ms at 16 req/s.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

VLLM_ANCHOR = {"model": "qwen3-0.6b", "gpu": "1x H100", "engine": "vLLM 0.19", "prompt_tokens": 512,
               "output_tokens": 128, "output_tok_s_at_saturation": 12100, "tpot_ms_at_16_rps": 2.4}

# Published configurations (HuggingFaceTB/SmolLM2-135M-Instruct, Qwen/Qwen3-0.6B config.json).
CONFIGS = {
    "smollm2-135m": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576,
        intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        hidden_act="silu", max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=2),
    "qwen3-0.6b": dict(
        model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=1024,
        intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        hidden_act="silu", max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True, attention_bias=False, use_sliding_window=False, sliding_window=None,
        max_window_layers=28, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643),
}
SMOKE_CONFIG = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=512, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=256,
    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)

def _orjson_stand_in() -> None:
    """``broker.messages`` imports orjson for the wire; nothing here encodes anything."""
    try:
        import orjson  # noqa: F401
    except ImportError:
        import types

        stub = types.ModuleType("orjson")
        stub.dumps = lambda obj, *a, **k: json.dumps(obj).encode()
        stub.loads = json.loads
        stub.JSONDecodeError = json.JSONDecodeError
        sys.modules["orjson"] = stub


# -- the checkpoint -----------------------------------------------------------------


def build_checkpoint(name: str, values: dict, root: Path, device: torch.device, dtype: torch.dtype) -> Path:
    """Random weights from ``values`` plus a word-level tokenizer over the whole vocabulary
    (token i is ``<i>``), saved as a Hugging Face checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    path = root / name
    values = dict(values)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.generation_config.eos_token_id = config.eos_token_id
    model.save_pretrained(path)
    del model
    vocab = {f"<{i}>": i for i in range(config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=f"<{config.pad_token_id}>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"<{config.eos_token_id}>",
                            pad_token=f"<{config.pad_token_id}>").save_pretrained(path)
    return path


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


# -- measuring ----------------------------------------------------------------------


class Clock:
    """Submission, first-token and last-token times and token counts per request."""

    def __init__(self):
        self.submitted: dict[str, float] = {}
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.tokens: dict[str, int] = {}

    def submit(self, rid: str) -> None:
        self.submitted[rid] = time.perf_counter()
        self.tokens[rid] = 0

    def progress(self, rid: str, total_tokens: int) -> None:
        """``total_tokens`` generated so far by ``rid`` (warm-up requests are not counted)."""
        if total_tokens > self.tokens.get(rid, total_tokens):
            now = time.perf_counter()
            self.first.setdefault(rid, now)
            self.last[rid] = now
            self.tokens[rid] = total_tokens

    def summary(self, wall_s: float) -> dict:
        done = [r for r in self.submitted if r in self.first]
        ttft = [1000 * (self.first[r] - self.submitted[r]) for r in done]
        tpot = [1000 * (self.last[r] - self.first[r]) / (self.tokens[r] - 1) for r in done if self.tokens[r] > 1]
        total = sum(self.tokens.values())
        return {"requests": len(done), "output_tokens": total, "wall_s": round(wall_s, 3),
                "output_tok_s": round(total / wall_s, 1) if wall_s else 0.0,
                "ttft_p50_ms": _pct(ttft, 50), "ttft_p95_ms": _pct(ttft, 95),
                "tpot_p50_ms": _pct(tpot, 50), "tpot_mean_ms": round(statistics.fmean(tpot), 3) if tpot else None}


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))], 3)


def closed_loop(submit, wait_finished, work: list[list[int]], concurrency: int, clock: Clock,
                deadline: float, prefix: str) -> float:
    """``concurrency`` clients over ``work``; each client sends its next prompt when its
    previous request ends (none are sent after ``deadline``). Returns the wall time.
    ``submit(rid, ids)`` sends one request; ``wait_finished(clock)`` waits for progress,
    notes it on ``clock`` and returns the ids of requests that ended."""
    todo = iter(enumerate(work))
    started = time.perf_counter()
    inflight = 0

    def send() -> bool:
        nxt = next(todo, None)
        if nxt is None or time.perf_counter() > deadline:
            return False
        rid = f"{prefix}{nxt[0]}"
        clock.submit(rid)
        submit(rid, nxt[1])
        return True

    for _ in range(concurrency):
        inflight += send()
    while inflight:
        for _ in wait_finished(clock):
            inflight -= 1
            inflight += send()
    return time.perf_counter() - started


def run_inferstack(model_dir: Path, name: str, device: torch.device, dtype: torch.dtype, levels: list[int],
                   args, deadline: float, record) -> None:
    from broker.messages import ErrorEvent, GenerateRequest, SamplingParams
    from gpu_worker.text.engine import TextEngine
    from inferstack.registry import Modality, ModelSpec
    from scheduler.claimed import Claimed

    context = args.prompt_tokens + args.output_tokens + 8
    spec = ModelSpec(name=name, modality=Modality.TEXT, path=str(model_dir), max_batch=max(levels),
                     max_prefill_tokens=args.max_prefill_tokens, context_length=context)
    cfg = json.loads((model_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * (torch.finfo(dtype).bits // 8)
    engine = TextEngine(spec, model_dir, device=device, dtype=dtype, max_seqs=max(levels),
                        kv_cache_bytes=max(levels) * context * per_token)  # every row at full length fits
    params = SamplingParams(max_tokens=args.output_tokens, temperature=0.0, ignore_eos=True)
    finished: list[str] = []
    clock = Clock()

    def emit(batch) -> None:  # the worker's publisher, in-process
        for o in batch:
            if isinstance(o.event, ErrorEvent):
                raise RuntimeError(f"{o.request_id}: {o.event.message}")
            if o.event is not None:
                clock.progress(o.request_id, o.event.start + len(o.event.token_ids))
            if o.request_done:
                finished.append(o.request_id)

    def submit(rid: str, ids: list[int]) -> None:
        engine.add(Claimed(GenerateRequest(id=rid, model=name, prompt_token_ids=ids, params=params,
                                              reply_to="bench"), 1), [])

    def wait_finished(on: Clock):
        nonlocal clock
        clock = on
        while not finished:
            if not engine.has_work():
                raise RuntimeError("the engine went idle with requests outstanding")
            engine.step(emit)
        out = list(finished)
        finished.clear()
        return out

    try:
        measure_levels(name, "inferstack", submit, wait_finished, levels, args, cfg["vocab_size"], deadline, record)
    finally:
        del engine
        _free(device)


def run_transformers_cb(model_dir: Path, name: str, device: torch.device, dtype: torch.dtype, levels: list[int],
                        args, deadline: float, record) -> None:
    """transformers' continuous batching (paged KV cache, its own scheduler) on the same
    checkpoint, streamed per request like ours."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    cfg = json.loads((model_dir / "config.json").read_text())
    gen = GenerationConfig(max_new_tokens=args.output_tokens, do_sample=False, eos_token_id=-1,
                           pad_token_id=cfg["pad_token_id"])
    # Recent releases take "sdpa" and switch to a paged or flash kernel themselves; older
    # ones wanted the paged implementation named at load.
    for attn in ("sdpa", "paged|sdpa", "sdpa_paged"):
        try:
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation=attn)
            manager = model.to(device).init_continuous_batching(generation_config=gen)
            break
        except (ValueError, KeyError, TypeError) as exc:
            print(f"transformers CB with attn_implementation={attn!r}: {exc}; trying the next", file=sys.stderr)
            model = None
            _free(device)
    else:
        raise RuntimeError("no attention implementation that transformers' continuous batching accepts")
    if hasattr(manager, "warmup"):  # CUDA graphs, captured before the clock starts as generate_batch does
        manager.warmup()
    manager.start()
    try:
        def submit(rid: str, ids: list[int]) -> None:
            manager.add_request(input_ids=ids, request_id=rid, max_new_tokens=args.output_tokens, streaming=True)

        def wait_finished(clock: Clock):
            out = manager.get_result(timeout=5)
            if out is None:
                if not manager.is_running() or time.perf_counter() > deadline + args.level_budget_s:
                    raise RuntimeError("transformers' generation thread stopped or hangs")
                return []
            if getattr(out, "error", None):
                raise RuntimeError(f"{out.request_id}: {out.error}")
            clock.progress(out.request_id, len(out.generated_tokens))
            return [out.request_id] if out.is_finished() else []

        measure_levels(name, "transformers-cb", submit, wait_finished, levels, args, cfg["vocab_size"], deadline,
                       record)
    finally:
        manager.stop(block=True, timeout=30)
        del manager, model
        _free(device)


def measure_levels(name: str, system: str, submit, wait_finished, levels: list[int], args, vocab: int,
                   deadline: float, record) -> None:
    for c in levels:
        if time.perf_counter() > deadline:
            record(name, system, c, {"skipped": "time budget spent"})
        else:
            record(name, system, c, measure(submit, wait_finished, c, args, vocab, deadline))


def measure(submit, wait_finished, c: int, args, vocab: int, deadline: float) -> dict:
    """One level, after two warm-up requests (one-time costs such as kernel selection and
    allocator growth are not charged to it). Request ids stay unique over the run, as
    transformers' manager wants."""
    pending, warm_up = 2, Clock()
    for i, ids in enumerate(prompts(2, args.prompt_tokens, vocab, seed=99)):
        submit(f"warm{c}-{i}", ids)
    while pending:
        pending -= len(wait_finished(warm_up))
    clock = Clock()
    work = prompts(max(c * args.requests_per_client, 4), args.prompt_tokens, vocab, seed=c)
    wall = closed_loop(submit, wait_finished, work, c, clock, min(deadline, time.perf_counter() + args.level_budget_s),
                       prefix=f"c{c}-")
    return clock.summary(wall)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def machine(device: torch.device) -> dict:
    import transformers

    info = {"device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return info


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen3-0.6b,smollm2-135m", help="the anchor's model first")
    ap.add_argument("--concurrency", default="1,32,128,256")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-prefill-tokens", type=int, default=8192, help="our engine's prompt tokens per step")
    ap.add_argument("--systems", default="inferstack,transformers-cb")
    ap.add_argument("--level-budget-s", type=float, default=40.0, help="no new requests after this, per level")
    ap.add_argument("--deadline-s", type=float, default=420.0, help="levels not started by then are skipped")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--smoke", action="store_true", help="tiny model, tiny sizes, CPU is fine (CI)")
    ap.add_argument("--out", default="gpu_bench.json")
    args = ap.parse_args(argv)
    began = time.perf_counter()
    _orjson_stand_in()
    from gpu_worker.precision import choose_dtype

    configs = {name: CONFIGS[name] for name in args.models.split(",")}
    if args.smoke:
        configs = {"tiny-llama": SMOKE_CONFIG}
        args.concurrency, args.prompt_tokens, args.output_tokens = "1,4", 16, 8
        args.max_prefill_tokens = 64
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    precision = choose_dtype(device)
    levels = [int(c) for c in args.concurrency.split(",")]
    systems = args.systems.split(",")
    deadline = began + args.deadline_s
    result = {"machine": machine(device), "dtype": precision.name, "dtype_reason": precision.reason,
              "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens, "concurrency": levels,
              "requests_per_client": args.requests_per_client, "anchor": VLLM_ANCHOR, "results": []}
    print(f"gpu_bench on {result['machine'].get('gpu', device)}: {precision.name} ({precision.reason}); "
          f"{args.prompt_tokens} in / {args.output_tokens} out, c = {levels}", flush=True)

    def record(model: str, system: str, c: int, row: dict) -> None:
        row = {"model": model, "system": system, "concurrency": c, **row}
        result["results"].append(row)
        Path(args.out).write_text(json.dumps(result, indent=2))  # partial results survive a timeout
        if "output_tok_s" not in row:  # skipped, or the system failed
            print(f"{model:13} {system:16} c={c:<4} {row}", flush=True)
        else:
            print(f"{model:13} {system:16} c={c:<4} {row['output_tok_s']:9.1f} tok/s  TTFT p50 "
                  f"{row['ttft_p50_ms']:8.1f} ms  TPOT p50 {row['tpot_p50_ms']} ms  ({row['requests']} req, "
                  f"{row['wall_s']:.1f} s; {time.perf_counter() - began:.0f} s elapsed)", flush=True)

    runners = {"inferstack": run_inferstack, "transformers-cb": run_transformers_cb}
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        for name, values in configs.items():
            started = time.perf_counter()
            model_dir = build_checkpoint(name, values, Path(tmp), device, precision.dtype)
            print(f"{name}: random-weight checkpoint built in {time.perf_counter() - started:.1f} s", flush=True)
            for system in systems:
                try:
                    runners[system](model_dir, name, device, precision.dtype, levels, args, deadline, record)
                except Exception as exc:  # noqa: BLE001 - one system failing must not lose the other's numbers
                    record(name, system, 0, {"error": f"{type(exc).__name__}: {exc}"[:500]})
                    print(f"{name} {system} failed: {exc!r}", file=sys.stderr, flush=True)
                    _free(device)
    result["total_s"] = round(time.perf_counter() - began, 1)
    result["vs_anchor"] = vs_anchor(result)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["vs_anchor"], indent=2))
    print(f"done in {result['total_s']} s: {args.out}", flush=True)


def vs_anchor(result: dict) -> dict:
    """Our Qwen3-0.6B numbers against vLLM's published ones (the issue's GPU targets)."""
    ours = [r for r in result["results"] if r["model"] == "qwen3-0.6b" and r["system"] == "inferstack"
            and "output_tok_s" in r]
    if not ours:
        return {}
    best = max(ours, key=lambda r: r["output_tok_s"])
    c1 = next((r for r in ours if r["concurrency"] == 1), None)
    return {"best_output_tok_s": best["output_tok_s"], "at_concurrency": best["concurrency"],
            "throughput_vs_vllm": round(best["output_tok_s"] / VLLM_ANCHOR["output_tok_s_at_saturation"], 3),
            "c1_tpot_ms": c1 and c1["tpot_p50_ms"],
            "c1_tpot_vs_vllm": c1 and c1["tpot_p50_ms"] and round(c1["tpot_p50_ms"] / VLLM_ANCHOR["tpot_ms_at_16_rps"], 2)}


if __name__ == "__main__":
    main()
