"""Tensor parallelism on the real SmolLM2-135M (9 query heads and 3 KV heads, split
2 + 1 over two gloo ranks): the same greedy text as on one device."""

from __future__ import annotations

import torch

from gpu_worker.settings import WorkerSettings
from inferstack import modelstore
from inferstack.redis_server import free_port
from inferstack.registry import Registry
from tests.engines import run_schedule
from tests.tp import start_follower, text_request, tp1_engine, tp2_engine

MODEL = "smollm2-135m"
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain what a hash table is in two sentences.", "List three prime numbers."]


def test_smollm2_two_ranks_give_the_same_greedy_text(tmp_path, one_thread):
    settings = WorkerSettings()
    spec = Registry.load(settings.models_file)[MODEL]
    model_dir = modelstore.resolve(spec, settings.cache_dir)
    reference = tp1_engine(spec, model_dir, torch.float32, max_seqs=4)
    tok = reference.tokenizer
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False), add_special_tokens=False)["input_ids"] for p in PROMPTS]
    reqs = [text_request(i, p, 48, ignore_eos=False) for i, p in enumerate(prompts)]
    schedule = {0: reqs[:2], 3: reqs[2:]}  # the second pair joins mid-flight
    want = run_schedule(reference, schedule)
    del reference

    port = free_port()
    follower = start_follower(tmp_path, MODEL, None, port, max_batch=4)
    engine = tp2_engine(spec, model_dir, torch.float32, follower, port, max_seqs=4)
    try:
        got = run_schedule(engine, schedule)
    finally:
        engine.close()
    assert follower.wait(60) == 0
    text = {rid: "".join(e[3] for e in events) for rid, events in got.items()}
    assert got == want, text
    assert "Paris" in text["r0"]
