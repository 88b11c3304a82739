"""A tiny random-weight Llama with a real (small, trained-here) byte-level BPE
tokenizer and chat template, saved like a Hugging Face checkpoint. It runs the
real loading and inference code in milliseconds; its outputs are noise."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Hello world! Streaming tokens one by one through Redis pub/sub.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "café naïve 日本語 ✓ — multi-byte characters must decode correctly.",
] * 20


def build_tiny_llama(path: Path, *, layers: int = 2, seed: int = 0, max_positions: int = 512, heads: int = 4,
                     kv_heads: int = 2, hidden: int = 64, intermediate: int = 128, arch: str = "llama") -> Path:
    """``arch="qwen3"``: the same with Qwen3's classes (per-head q/k norms, explicit
    head_dim); heads and sizes vary to test tensor-parallel splits."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    path = Path(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[arch]
    config = config_cls(
        vocab_size=len(fast), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16 if arch == "qwen3" else hidden // heads,
        max_position_embeddings=max_positions,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=None,
        tie_word_embeddings=arch == "llama", architectures=[model_cls.__name__],
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    model.save_pretrained(path)
    return path


def registry_toml(path: Path, model_dir: Path, name: str = "tiny", max_batch: int = 8,
                  max_prefill_tokens: int = 256, reasoning: bool = False) -> Path:
    path.write_text(f"""
[models."{name}"]
modality = "text"
tool_parser = "hermes"
path = "{model_dir}"
max_batch = {max_batch}
max_prefill_tokens = {max_prefill_tokens}
reasoning = {str(reasoning).lower()}
""")
    return path
