"""Images in chat messages: ``data:`` URLs decoded, http(s) URLs fetched by the API
with a time and size limit, every image checked by decoding it (and against a pixel
limit, so a decompression bomb is refused), then re-encoded as PNG for the worker."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io

import httpx

from api.errors import OpenAIError

MAX_PIXELS = 40_000_000


def _bad(message: str) -> OpenAIError:
    return OpenAIError(400, message, param="messages", code="invalid_image")


async def fetch_image(url: str, *, timeout_s: float, max_bytes: int) -> bytes:
    """The image behind ``url`` as PNG bytes, or a 400 saying what is wrong."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header or not header[5:].startswith("image/"):
            raise _bad("image data URLs must look like data:image/png;base64,...")
        if len(payload) > max_bytes * 4 // 3 + 4:
            raise _bad(f"an image is larger than {max_bytes} bytes")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise _bad("the image data URL is not valid base64") from None
    elif url.startswith(("http://", "https://")):
        raw = await _download(url, timeout_s, max_bytes)
    else:
        raise _bad("image_url must be a data: URL or an http(s) URL")
    return await asyncio.to_thread(_normalize, raw)


async def _download(url: str, timeout_s: float, max_bytes: int) -> bytes:
    try:
        async with asyncio.timeout(timeout_s):
            async with httpx.AsyncClient(follow_redirects=True, timeout=timeout_s) as client:
                async with client.stream("GET", url) as r:
                    if r.status_code != 200:
                        raise _bad(f"fetching the image at {url} answered HTTP {r.status_code}")
                    if int(r.headers.get("content-length") or 0) > max_bytes:
                        raise _bad(f"the image at {url} is larger than {max_bytes} bytes")
                    chunks, size = [], 0
                    async for chunk in r.aiter_bytes():
                        size += len(chunk)
                        if size > max_bytes:
                            raise _bad(f"the image at {url} is larger than {max_bytes} bytes")
                        chunks.append(chunk)
                    return b"".join(chunks)
    except TimeoutError:
        raise _bad(f"fetching the image at {url} took longer than {timeout_s:g} s") from None
    except httpx.HTTPError as exc:
        raise _bad(f"could not fetch the image at {url}: {type(exc).__name__}") from None


def _normalize(raw: bytes) -> bytes:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as image:
            if image.width * image.height > MAX_PIXELS:
                raise _bad(f"an image has more than {MAX_PIXELS} pixels")
            image = image.convert("RGB")
            out = io.BytesIO()
            image.save(out, format="PNG")
            return out.getvalue()
    except OpenAIError:
        raise
    except Exception:  # noqa: BLE001 - PIL raises many kinds for undecodable input
        raise _bad("an image could not be decoded (supported: PNG, JPEG, WebP, GIF, ...)") from None
