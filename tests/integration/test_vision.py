"""Vision-language chat through the real API and a worker running a tiny
Qwen2_5_VLForConditionalGeneration: image parts (data: and http URLs), streaming,
batching, and limits."""

from __future__ import annotations

import base64
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import torch
from PIL import Image

from api.vision import vision_tokens
from broker.messages import GenerateRequest, SamplingParams, VisionRequest
from gpu_worker.vision.engine import VisionEngine
from inferstack.registry import Modality, ModelSpec
from scheduler.queue import Claimed
from tests.stack import Stack


def png(width: int, height: int, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def engine(tiny_qwen_vl_dir):
    return VisionEngine(ModelSpec(name="tiny-vl", modality=Modality.VISION), tiny_qwen_vl_dir,
                        device=torch.device("cpu"), dtype=torch.float32, max_batch=4)


def prompt_ids(engine, image_tokens: list[int], text: str) -> list[int]:
    content = [{"type": "image"} for _ in image_tokens] + [{"type": "text", "text": text}]
    rendered = engine.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                    add_generation_prompt=True, tokenize=False)
    pad = engine.image_token_id
    out, images = [], iter(image_tokens)
    for token in engine.tokenizer(rendered, add_special_tokens=False)["input_ids"]:
        out.extend([pad] * next(images) if token == pad else [token])
    return out


def run(engine, requests) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}

    def emit(out):
        for o in out:
            if o.event is not None:
                tokens.setdefault(o.request_id, []).extend(o.event.token_ids)

    for r in requests:
        engine.add(Claimed(r, 1), [])
    while engine.has_work():
        engine.step(emit)
    return tokens


def test_batched_decoding_equals_one_at_a_time_and_transformers_generate(engine):
    images = [png(64, 48), png(120, 90, (0, 0, 255))]
    counts = [vision_tokens(engine.processor, i) for i in images]
    assert counts[0] != counts[1]  # different image sizes: different prompt lengths in one batch
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    requests = [
        VisionRequest(id="a", model="tiny-vl", prompt_token_ids=prompt_ids(engine, [counts[0]], "Describe this image."),
                      params=params, reply_to="-", images=[base64.b64encode(images[0]).decode()]),
        VisionRequest(id="b", model="tiny-vl", prompt_token_ids=prompt_ids(engine, [counts[1]], "What is it?"),
                      params=params, reply_to="-", images=[base64.b64encode(images[1]).decode()]),
        GenerateRequest(id="c", model="tiny-vl", prompt_token_ids=prompt_ids(engine, [], "Hello world"),
                        params=params, reply_to="-"),
    ]
    together = run(engine, requests)
    alone = {}
    for r in requests:
        alone.update(run(engine, [r]))
    assert together == alone and all(len(t) == 6 for t in together.values())

    ids = torch.tensor([requests[1].prompt_token_ids])
    pixels = engine.processor(images=[Image.open(io.BytesIO(images[1]))], return_tensors="pt")
    reference = engine.net.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == engine.image_token_id).int(),
        pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"],
        max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert together["b"] == reference[0, ids.shape[1]:].tolist()


def test_bfloat16_engine_runs(tiny_qwen_vl_dir):
    # auto picks bf16 on CPUs with native bf16: the vision tower, rotary positions and sampler must run in it
    bf16 = VisionEngine(ModelSpec(name="tiny-vl", modality=Modality.VISION), tiny_qwen_vl_dir,
                        device=torch.device("cpu"), dtype=torch.bfloat16, max_batch=2)
    image = png(64, 48)
    prompt = prompt_ids(bf16, [vision_tokens(bf16.processor, image)], "Describe this image.")
    req = VisionRequest(id="h", model="tiny-vl", prompt_token_ids=prompt,
                        params=SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=True),
                        reply_to="-", images=[base64.b64encode(image).decode()])
    assert len(run(bf16, [req])["h"]) == 4 and bf16.net.dtype == torch.bfloat16


class _ImageServer:
    """A local HTTP server with one image, to exercise URL fetching."""

    def __init__(self, body: bytes):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                if self.path != "/cat.png":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory, tiny_qwen_vl_dir):
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    tmp = tmp_path_factory.mktemp("vision")
    models = tmp / "models.toml"
    models.write_text(f'[models."tiny-vl"]\nmodality = "vision"\npath = "{tiny_qwen_vl_dir}"\nmax_batch = 4\n'
                      'memory_gb = 0.05\n')
    # the image server below is on loopback, which image URLs may reach only when opened
    s = Stack(redis_server.url, models, tmp / "cache",
              api_kw={"fetch_max_bytes": 200_000, "fetch_allow_networks": "127.0.0.0/8"})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def image_server():
    server = _ImageServer(png(80, 60, (10, 200, 10)))
    yield server
    server.stop()


def test_openai_sdk_chat_with_an_image_part(stack, image_server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=120)
    result = client.chat.completions.create(model="tiny-vl", max_tokens=5, extra_body={"ignore_eos": True},
                                            messages=[{"role": "user", "content": [
                                                {"type": "image_url", "image_url": {"url": data_url(png(64, 48))}},
                                                {"type": "text", "text": "Describe this image."}]}])
    assert result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 5
    text_only = client.chat.completions.create(model="tiny-vl", max_tokens=3, extra_body={"ignore_eos": True},
                                               messages=[{"role": "user", "content": "Hello"}])
    # the image's vision tokens count in the prompt
    assert result.usage.prompt_tokens > text_only.usage.prompt_tokens

    stream = client.chat.completions.create(model="tiny-vl", max_tokens=6, stream=True,
                                            extra_body={"ignore_eos": True}, messages=[{"role": "user", "content": [
                                                {"type": "image_url", "image_url": {"url": f"{image_server.url}/cat.png"}},
                                                {"type": "text", "text": "What is in the picture?"}]}])
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len([c for c in chunks if c.choices]) >= 3  # streamed, not one blob


@pytest.mark.parametrize("url,fragment", [
    ("data:image/png;base64,not-base64!", "base64"),
    (data_url(b"definitely not an image"), "decoded"),
    (data_url(png(600, 600) + b"\0" * 200_000), "larger"),
    ("ftp://example.com/cat.png", "http"),
    ("{server}/missing.png", "could not be fetched"),  # what the remote side answered is not echoed
])
def test_bad_images_are_400_and_name_the_problem(stack, image_server, url, fragment):
    r = httpx.post(f"{stack.url}/v1/chat/completions", timeout=30, json={
        "model": "tiny-vl", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url.format(server=image_server.url)}},
            {"type": "text", "text": "hi"}]}]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_image" and fragment in r.json()["error"]["message"]
