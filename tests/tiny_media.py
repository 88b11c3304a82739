"""Tiny random-weight media models built offline from the real models' classes and
saved like their Hugging Face checkpoints, so the real loading and inference code runs
in tests. Outputs are noise; shapes, formats, batching and job flow are real."""

from __future__ import annotations

import json
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


KOKORO_SYMBOLS = (" .,!?;:'\"-—…()“”ˈˌːʔ" "abcdefhijklmnopqrstuvwxyzðŋɐɑɒɔəɚɛɜɡɪɫɬɹɾʃʊʌʒʤʧθæçβ"
                  "AIOQWYᵊ")


def build_tiny_kokoro(path: Path, seed: int = 0, voices: tuple[str, ...] = ("af_heart", "bf_emma")) -> Path:
    """A Kokoro KModel from a tiny config (the decoder's fixed widths keep it at a few
    million weights), saved like hexgrad/Kokoro-82M: config.json, kokoro-v1_0.pth,
    voices/<name>.pt (style packs of shape [510, 1, 256])."""
    import torch
    from kokoro import KModel

    path = Path(path)
    (path / "voices").mkdir(parents=True, exist_ok=True)
    config = {
        "istftnet": {"upsample_kernel_sizes": [20, 12], "upsample_rates": [10, 6], "gen_istft_hop_size": 5,
                     "gen_istft_n_fft": 20, "resblock_dilation_sizes": [[1, 3, 5]], "resblock_kernel_sizes": [3],
                     "upsample_initial_channel": 512},
        "dim_in": 64, "dropout": 0.2, "hidden_dim": 512, "max_conv_dim": 512, "max_dur": 2, "multispeaker": True,
        "n_layer": 1, "n_mels": 80, "n_token": 178, "style_dim": 128, "text_encoder_kernel_size": 5,
        "plbert": {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
                   "max_position_embeddings": 512, "num_hidden_layers": 1, "dropout": 0.1},
        "vocab": {c: i + 1 for i, c in enumerate(dict.fromkeys(KOKORO_SYMBOLS))},
    }
    (path / "config.json").write_text(json.dumps(config, ensure_ascii=False))
    weights = path / "kokoro-v1_0.pth"
    torch.save({}, weights)  # KModel loads whatever the file holds: nothing = its random init
    torch.manual_seed(seed)
    model = KModel(repo_id="hexgrad/Kokoro-82M", config=str(path / "config.json"), model=str(weights))
    torch.save({name: getattr(model, name).state_dict()
                for name in ("bert", "bert_encoder", "predictor", "text_encoder", "decoder")}, weights)
    for voice in voices:
        torch.save(torch.randn(510, 1, 256) * 0.1, path / "voices" / f"{voice}.pt")
    return path
