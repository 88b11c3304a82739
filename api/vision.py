"""Chat messages with image parts -> prompt token ids for a vision-language model
(Qwen2.5-VL style: the chat template writes one image-pad token per image, which is
expanded here to the number of vision tokens the image processor will produce), plus
the images themselves for the worker."""

from __future__ import annotations

import asyncio
import base64
import io
import threading

from api.catalog import TextModel
from api.fetch import FetchPolicy
from api.media import fetch_image

_processors: dict[str, object] = {}
_lock = threading.Lock()

IMAGE_PAD = "<|image_pad|>"


def image_processor(model: TextModel, cache_dir):
    """The model's image processor (PIL backend: no torchvision needed), loaded once."""
    from transformers import AutoImageProcessor

    from inferstack import modelstore

    with _lock:
        name = model.spec.name
        if name not in _processors:
            path = modelstore.resolve(model.spec, cache_dir)
            _processors[name] = AutoImageProcessor.from_pretrained(str(path), backend="pil")
        return _processors[name]


def vision_tokens(processor, png: bytes) -> int:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        width, height = image.size
    patches = processor.get_number_of_image_patches(height, width)
    return patches // (processor.merge_size ** 2)


async def vision_prompt(model: TextModel, messages, *, cache_dir,
                        policy: FetchPolicy) -> tuple[list[int], list[str]]:
    """(prompt ids with expanded image tokens, base64 PNG images in prompt order)."""
    rendered, urls = [], []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        if m.content is None or isinstance(m.content, str):
            rendered.append({"role": role, "content": m.content or ""})
            continue
        parts = []
        for p in m.content:
            if p.type == "text":
                parts.append({"type": "text", "text": p.text or ""})
            elif p.type == "image_url" and p.image_url is not None:
                parts.append({"type": "image"})
                urls.append(p.image_url.url)
        rendered.append({"role": role, "content": parts})
    images = await asyncio.gather(*(fetch_image(u, policy) for u in urls))
    processor = await asyncio.to_thread(image_processor, model, cache_dir)
    counts = [vision_tokens(processor, png) for png in images]
    ids = await model.render_chat(rendered)
    pad = model.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    expanded, at = [], 0
    for token in ids:
        if token == pad and at < len(counts):
            expanded.extend([pad] * counts[at])
            at += 1
        else:
            expanded.append(token)
    return expanded, [base64.b64encode(png).decode() for png in images]
