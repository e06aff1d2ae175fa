"""A transcription service: Whisper loads in the background while the server already answers.

Run it::

    pip install 'modelcache[fastapi,whisper]'
    uvicorn fastapi_whisper:app --host 0.0.0.0 --port 8000

Then::

    curl -s localhost:8000/health        # 200 at once: the process serves (liveness)
    curl -s localhost:8000/ready         # 503 while Whisper downloads and loads, then 200
    curl -s -X POST localhost:8000/transcribe --data-binary @speech.wav   # 16-bit PCM WAV

``/models`` shows the download's progress (open it in a browser for a live page).
``/transcribe`` answers 503 with the model's status (and ``Retry-After``) until Whisper is
ready, instead of holding the request.

Environment:

- ``WHISPER_SIZE``: ``tiny`` (default), ``base``, ``small``, ``tiny.en`` ... (see ``recipes``).
- ``WHISPER_SOURCE``: where the checkpoint comes from instead of OpenAI's URL (your mirror:
  ``s3://bucket/whisper/tiny.pt``, a volume path ...); ``WHISPER_SHA256``: its digest when it
  is not the official file.
- ``MAX_TOKENS``: cap the tokens decoded per 30-second window (bounds a request's time).
- ``MODELCACHE_HOME``, ``MODELCACHE_QUANTIZE=int8`` ...: see the environment variables page.
"""

from __future__ import annotations

import io
import os
import wave
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request

from modelcache import ModelHandle, Registry
from modelcache.integrations.fastapi import lifespan, model, router
from modelcache.recipes import whisper

SAMPLE_RATE = 16_000  # what Whisper expects


def whisper_handle() -> ModelHandle:
    """Whisper, fetched and loaded in a background thread when the app starts."""
    options: dict[str, Any] = {"strategy": "background"}
    if source := os.environ.get("WHISPER_SOURCE"):
        options["source"] = source
        if digest := os.environ.get("WHISPER_SHA256"):
            options["sha256"] = digest
    return whisper(os.environ.get("WHISPER_SIZE", "tiny"), **options)


speech = whisper_handle()
models = Registry([speech])
app = FastAPI(title="transcription", lifespan=lifespan(models))
app.include_router(router(models))  # /health, /ready, /models, POST /models/{name}/load

# A route that declares `net: Whisper` gets the loaded model, or the client gets a 503 with
# the model's status while it downloads (the request is not held).
Whisper = Annotated[Any, Depends(model(models, speech.name))]


def read_wav(data: bytes) -> np.ndarray:
    """16-bit PCM WAV bytes as float32 mono samples at 16 kHz."""
    with wave.open(io.BytesIO(data)) as wav:
        if wav.getsampwidth() != 2:
            raise ValueError("expected 16-bit PCM")
        rate, channels = wav.getframerate(), wav.getnchannels()
        frames = wav.readframes(wav.getnframes())
    samples = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)
    if rate != SAMPLE_RATE:
        positions = np.arange(0, len(samples), rate / SAMPLE_RATE)
        samples = np.interp(positions, np.arange(len(samples)), samples).astype(np.float32)
    return samples


async def body(request: Request) -> bytes:
    """The request's raw body (the WAV file)."""
    return await request.body()


@app.post("/transcribe")
def transcribe(audio: Annotated[bytes, Depends(body)], net: Whisper) -> dict[str, Any]:
    """Transcribe a WAV body; runs in FastAPI's thread pool, the event loop stays free."""
    try:
        samples = read_wav(audio)
    except (wave.Error, ValueError, EOFError) as error:
        raise HTTPException(400, f"send a 16-bit PCM WAV file: {error}") from None
    options: dict[str, Any] = {"fp16": False, "temperature": 0.0}
    if max_tokens := os.environ.get("MAX_TOKENS"):
        options["sample_len"] = int(max_tokens)
    result = net.transcribe(samples, condition_on_previous_text=False, **options)
    return {
        "text": result["text"].strip(),
        "language": result["language"],
        "seconds": round(len(samples) / SAMPLE_RATE, 3),
    }
