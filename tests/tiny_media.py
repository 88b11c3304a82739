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


QWEN_VL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|image_pad|>", "<|video_pad|>"]

QWEN_VL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_qwen_vl(path: Path, seed: int = 0) -> Path:
    """A Qwen2_5_VLForConditionalGeneration from a tiny config (2-layer vision tower and
    text model), with a small BPE tokenizer carrying Qwen's vision special tokens and
    chat template, and the Qwen2-VL image processor (PIL backend)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from tests.tiny import CORPUS

    path = Path(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS + ["Describe this image. What is in the picture?"] * 10, trainers.BpeTrainer(
        vocab_size=400, special_tokens=QWEN_VL_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = QWEN_VL_TEMPLATE
    fast.save_pretrained(path)
    # Small images stay small: 4 to 64 patches of 28x28 pixels.
    Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64).save_pretrained(path)
    ids = {s: fast.convert_tokens_to_ids(s) for s in QWEN_VL_SPECIALS}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None,
                         tie_word_embeddings=True, initializer_range=0.5),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1], initializer_range=0.5),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    torch.manual_seed(seed)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    return path


def build_tiny_cogvideox(path: Path, seed: int = 0) -> Path:
    """A CogVideoXPipeline shaped like CogVideoX-2B (CogVideoXTransformer3DModel,
    AutoencoderKLCogVideoX, T5EncoderModel with a Unigram T5 tokenizer, DDIM scheduler),
    tiny: 16x16 frames, one transformer layer (the shapes of diffusers' own tests)."""
    import torch
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    path = Path(path)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(ch, -3.0) for ch in string.ascii_lowercase + string.digits + ".,!?'-"]
    pieces += [("▁" + ch, -2.5) for ch in string.ascii_lowercase]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=16)
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                           num_heads=4, relative_attention_num_buckets=8))
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=32, num_layers=1, sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=16)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler())
    out = path / "model"
    pipe.save_pretrained(out)
    return out
