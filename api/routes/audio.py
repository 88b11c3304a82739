"""POST /v1/audio/speech: text-to-speech through the fair queue. The whole file in the
requested format by default; ``response_format: pcm`` streams raw PCM as chunks are
synthesized, and ``stream_format: sse`` streams base64 PCM deltas as server-sent
events (``speech.audio.delta`` ... ``speech.audio.done``)."""

from __future__ import annotations

import asyncio
import base64
import json
import time

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from api.audio import MEDIA_TYPES, encode
from api.errors import OpenAIError
from api.generation import Generation, watch_disconnect
from api.sse import event_stream
from api.routes._text import new_id, state_of
from api.routes.media import media_spec
from api.schemas import SpeechRequestBody
from broker.messages import AudioChunk, SpeechRequest
from inferstack.registry import Modality

router = APIRouter()


class SpeechGeneration(Generation):
    """A speech request's audio chunks, in order, each once (repeats after a resume on
    another worker are dropped by chunk index)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._next_index = 0
        self._final = False

    @property
    def done(self) -> bool:
        return self._final

    def _accept(self, ev: AudioChunk) -> list[AudioChunk]:
        if ev.index != self._next_index:
            return []  # a repeat from a resumed request (audio is not logged, so no gaps to fill)
        self._next_index += 1
        self._final = ev.final
        return [ev]


@router.post("/v1/audio/speech")
async def create_speech(body: SpeechRequestBody, request: Request):
    state = state_of(request)
    identity = state.keys.identify(request.headers.get("authorization"), body.user)
    spec = await media_spec(state, body.model, Modality.SPEECH)
    req = SpeechRequest(id=new_id("speech"), model=spec.name, input=body.input, voice=body.voice,
                        reply_to=state.relay.channel, speed=body.speed, user=identity.user,
                        tier=identity.with_priority(body.priority), created_at=time.time())
    gen = SpeechGeneration(state, req, weight=identity.weight, user_cap=identity.max_queued)
    await gen.admit()
    events = gen.events()
    watcher = asyncio.create_task(watch_disconnect(request, [gen]))
    try:
        first = await anext(events)  # errors before any audio are real HTTP errors
    except BaseException:
        watcher.cancel()
        gen.close()
        raise

    async def chunks():
        complete = False
        try:
            yield first
            async for ev in events:
                yield ev
            complete = True
        finally:
            watcher.cancel()
            if not complete:
                await gen.cancel()
            gen.close()

    if body.stream_format == "sse":
        async def sse():
            samples = 0
            try:
                async for ev in chunks():
                    samples += len(base64.b64decode(ev.pcm)) // 2
                    yield {"data": json.dumps({"type": "speech.audio.delta", "audio": ev.pcm})}
            except OpenAIError as exc:
                yield {"data": json.dumps(exc.body())}
                return
            yield {"data": json.dumps({"type": "speech.audio.done", "sample_rate": first.sample_rate,
                                       "usage": {"input_tokens": len(body.input), "output_tokens": samples,
                                                 "total_tokens": len(body.input) + samples}})}

        return event_stream(sse())

    if body.response_format == "pcm":
        async def raw():
            async for ev in chunks():
                yield base64.b64decode(ev.pcm)

        return StreamingResponse(raw(), media_type=MEDIA_TYPES["pcm"],
                                 headers={"X-Sample-Rate": str(first.sample_rate)})

    pcm = b"".join([base64.b64decode(ev.pcm) async for ev in chunks()])
    audio = await asyncio.to_thread(encode, pcm, first.sample_rate, body.response_format)
    return Response(audio, media_type=MEDIA_TYPES[body.response_format])
