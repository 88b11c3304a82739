import logging

import pytest
import torch

from gpu_worker.precision import choose_dtype, cpu_flags

CPU = torch.device("cpu")
AVX2 = {"fpu", "avx", "avx2", "fma"}
ZEN4 = AVX2 | {"avx512f", "avx512_bf16"}
SAPPHIRE_RAPIDS = AVX2 | {"avx512f", "amx_tile", "amx_bf16"}


def test_auto_takes_bf16_only_on_cpus_that_compute_it_natively():
    for flags, native in [(ZEN4, "avx512_bf16"), (SAPPHIRE_RAPIDS, "amx_bf16")]:
        choice = choose_dtype(CPU, flags=flags)
        assert choice.dtype is torch.bfloat16 and native in choice.reason
    choice = choose_dtype(CPU, flags=AVX2)
    assert choice.dtype is torch.float32 and "no native bf16" in choice.reason


def test_the_registry_pins_and_the_environment_overrides():
    assert choose_dtype(CPU, "float32", flags=ZEN4).dtype is torch.float32
    pinned = choose_dtype(CPU, "bfloat16", flags=AVX2)
    assert pinned.dtype is torch.bfloat16 and "registry" in pinned.reason
    env = choose_dtype(CPU, "bfloat16", "float32", flags=ZEN4)
    assert env.dtype is torch.float32 and "INFERSTACK_DTYPE" in env.reason
    assert choose_dtype(CPU, "float32", "auto", flags=ZEN4).dtype is torch.bfloat16


def test_half_precision_pins_fall_back_to_fp32_on_cpu():
    choice = choose_dtype(CPU, "float16", flags=ZEN4)
    assert choice.dtype is torch.float32 and "GPUs" in choice.reason


def test_unknown_dtypes_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="bfloat16"):
        choose_dtype(CPU, "fp8")


def test_cpu_flags_reads_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\nbugs\t\t: spectre\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_the_worker_logs_the_choice_and_the_reason(tiny_model_dir, monkeypatch, caplog):
    from gpu_worker.settings import WorkerSettings
    from gpu_worker.worker import build_engine
    from inferstack.registry import Modality, ModelSpec

    monkeypatch.setenv("INFERSTACK_DTYPE", "bfloat16")
    spec = ModelSpec(name="tiny", modality=Modality.TEXT, path=str(tiny_model_dir), max_batch=2)
    with caplog.at_level(logging.INFO, logger="gpu_worker.worker"):
        engine = build_engine(spec, WorkerSettings(), CPU, model_dir=tiny_model_dir)
    assert engine.runner.dtype is torch.bfloat16
    assert "tiny: bfloat16 on cpu (pinned by the INFERSTACK_DTYPE)" in caplog.text
