"""Images in chat messages: ``data:`` URLs decoded, http(s) URLs fetched by the API
(public addresses only, within a time and size limit: ``api.fetch``), every image
checked by decoding it (and against a pixel limit, so a decompression bomb is
refused), then re-encoded as PNG for the worker."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging

from api import fetch
from api.errors import OpenAIError
from api.fetch import FetchPolicy

log = logging.getLogger(__name__)

MAX_PIXELS = 40_000_000


def _bad(message: str) -> OpenAIError:
    return OpenAIError(400, message, param="messages", code="invalid_image")


async def fetch_image(url: str, policy: FetchPolicy) -> bytes:
    """The image behind ``url`` as PNG bytes, or a 400 saying what is wrong."""
    max_bytes = policy.max_bytes
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
        raw = await _download(url, policy)
    else:
        raise _bad("image_url must be a data: URL or an http(s) URL")
    return await asyncio.to_thread(_normalize, raw)


async def _download(url: str, policy: FetchPolicy) -> bytes:
    try:
        return await fetch.download(url, policy)
    except TimeoutError:
        raise _bad(f"fetching an image URL took longer than {policy.timeout_s:g} s") from None
    except fetch.TooLarge:
        raise _bad(f"an image is larger than {policy.max_bytes} bytes") from None
    except fetch.Refused as exc:  # what the remote side said stays in the log
        log.info("image URL refused: %s", exc)
        raise _bad("an image URL could not be fetched: it must be a public http(s) URL that answers 200 "
                   "with the image") from None


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
