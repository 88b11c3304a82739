"""Tiny random-weight media models built offline from the real models' classes and
saved like their Hugging Face checkpoints, so the real loading and inference code runs
in tests. Outputs are noise; shapes, formats, batching and job flow are real."""

from __future__ import annotations

import string
from pathlib import Path


def _clip_tokenizer(max_length: int = 16):
    """A character-level CLIP BPE vocabulary (no merges): enough for any ASCII prompt."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + ".,!?'-":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def build_tiny_sd(path: Path, seed: int = 0) -> Path:
    """A StableDiffusionPipeline shaped like SD Turbo (UNet2DConditionModel, AutoencoderKL,
    CLIPTextModel, Euler scheduler with trailing timesteps), a few thousand weights."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    tokenizer = _clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=2)
    vae = AutoencoderKL(block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16)
    scheduler = EulerDiscreteScheduler(timestep_spacing="trailing", prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out = path / "model"
    pipe.save_pretrained(out)
    return out
