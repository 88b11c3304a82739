"""The CUDA attention paths' bookkeeping, on CPU: block tables, cumulative and used
lengths, slot mapping and the CUDA-graph decode buffers, with the flash varlen
kernel's contract stated in plain torch (``varlen_reference``), over the paged cache.
Greedy output must equal unbatched greedy decoding exactly (float64), as with the CPU
paths. On a GPU the real kernels run too."""

import pytest
import torch

from gpu_worker.text import attention
from gpu_worker.text.attention import SdpaBackend, VarlenBackend, probe, varlen_reference
from gpu_worker.text.graphs import DecodeGraphs
from gpu_worker.text.kvcache import PagedKVCache
from gpu_worker.text.slotcache import SlotAttention, SlotKVCache
from tests.integration.test_engine import reference_greedy, request, run


@pytest.fixture(scope="module")
def schedule():
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 390, (n,), generator=g).tolist() for n in (5, 23, 9, 40, 3, 17, 70)]
    reqs = [request(i, p, m) for i, (p, m) in enumerate(zip(prompts, [12, 5, 20, 7, 15, 9, 11]))]
    return reqs, {0: reqs[:2], 3: reqs[2:4], 4: [reqs[4]], 9: reqs[5:]}


PAGED = {"attention_backend": "sdpa"}
"""The paged cache on CPU (SDPA over its blocks), where the default is slot rows."""


def small_cache(runner):
    cfg = runner.config
    return lambda: PagedKVCache(cfg.num_hidden_layers, 2, cfg.num_key_value_heads,
                                cfg.hidden_size // cfg.num_attention_heads, dtype=runner.dtype, device=runner.device,
                                max_len=4 * runner.cache.block_size, block_size=runner.cache.block_size)


@pytest.mark.parametrize("paged", [True, False], ids=["paged", "varlen"])
def test_varlen_backends_match_unbatched_greedy(engine_factory, schedule, paged):
    engine = engine_factory(max_seqs=3, max_prefill_tokens=16, runner_options=PAGED)
    runner = engine.runner
    runner.backend = VarlenBackend(varlen_reference, paged=paged)
    if paged:
        runner.graphs = DecodeGraphs(runner, [1, 2, 3], capture=False)  # the graph buffers, run eagerly
    reqs, arrivals = schedule
    outputs = run(engine, arrivals)
    for req in reqs:
        assert outputs[req.id] == reference_greedy(runner.model, req.prompt_token_ids, req.params.max_tokens), req.id


def test_probe_accepts_a_faithful_kernel_and_rejects_a_wrong_one(engine_factory):
    runner = engine_factory(max_seqs=2, runner_options=PAGED).runner
    make, heads = small_cache(runner), runner.config.num_attention_heads
    assert probe(VarlenBackend(varlen_reference, paged=True), make, heads, runner.dtype) is None

    def not_causal(*args, **kw):
        return varlen_reference(*args, **{**kw, "window_size": (-1, -1)})

    assert "differs" in probe(VarlenBackend(not_causal, paged=True), make, heads, runner.dtype)
    assert "RuntimeError" in probe(VarlenBackend(lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no")), True),
                                   make, heads, runner.dtype)


def test_a_cpu_keeps_a_row_per_slot_unless_told_to_page(engine_factory):
    runner = engine_factory(max_seqs=2).runner
    assert isinstance(runner.cache, SlotKVCache) and isinstance(runner.backend, SlotAttention)
    runner = engine_factory(max_seqs=2, runner_options=PAGED).runner
    assert isinstance(runner.cache, PagedKVCache) and isinstance(runner.backend, SdpaBackend)
    assert isinstance(attention.choose(torch.device("cpu"), None, 4, torch.float32), SdpaBackend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_backend_and_graphs_match_unbatched_greedy(tiny_model_dir, schedule):
    from gpu_worker.text.engine import TextEngine
    from inferstack.registry import Modality, ModelSpec

    spec = ModelSpec(name="tiny", modality=Modality.TEXT, path=str(tiny_model_dir))
    engine = TextEngine(spec, tiny_model_dir, device=torch.device("cuda"), dtype=torch.float32, max_seqs=3,
                        max_prefill_tokens=16)
    reqs, arrivals = schedule
    outputs = run(engine, arrivals)
    ref = engine.runner.model.to("cpu")
    for req in reqs:
        assert outputs[req.id] == reference_greedy(ref, req.prompt_token_ids, req.params.max_tokens), req.id
