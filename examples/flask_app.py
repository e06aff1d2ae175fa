"""A Flask transcription app: Whisper loads on demand (or at startup), one switch apart.

Run it::

    pip install 'modelcache[flask,whisper]'
    python flask_app.py                          # development server on 127.0.0.1:5000
    gunicorn -w 1 --threads 4 flask_app:app      # production

By default the model loads on demand: the server is up in a second, ``/health`` answers 200,
``/ready`` 503, and the first ``POST /transcribe`` (or ``POST /models/whisper-tiny/load``)
starts the download; until Whisper is ready, ``/transcribe`` answers 503 with the model's
status and ``Retry-After``. With ``MODELCACHE_STRATEGY=eager`` the model loads at startup
instead: the server only listens once Whisper is ready, so every request finds it loaded.

Environment: ``WHISPER_SIZE`` (``tiny``), ``WHISPER_SOURCE`` / ``WHISPER_SHA256`` (a mirror of
the checkpoint), ``MAX_TOKENS`` (tokens decoded per 30-second window), ``HOST`` / ``PORT``
(the development server), ``MODELCACHE_QUANTIZE=int8`` (fits a 512 MB host).
"""

from __future__ import annotations

import io
import os
import wave
from typing import Any

import numpy as np
from flask import Flask, Response, jsonify, request

from modelcache import ModelHandle, Registry
from modelcache.integrations.flask import get_model, init_app
from modelcache.recipes import whisper

SAMPLE_RATE = 16_000  # what Whisper expects


def whisper_handle() -> ModelHandle:
    """Whisper, loaded on first use (``MODELCACHE_STRATEGY`` overrides the strategy)."""
    options: dict[str, Any] = {"strategy": "lazy"}
    if source := os.environ.get("WHISPER_SOURCE"):
        options["source"] = source
        if digest := os.environ.get("WHISPER_SHA256"):
            options["sha256"] = digest
    return whisper(os.environ.get("WHISPER_SIZE", "tiny"), **options)


speech = whisper_handle()
app = Flask(__name__)
init_app(app, Registry([speech]))  # /health, /ready, /models, POST /models/<name>/load


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


@app.post("/transcribe")
def transcribe() -> Response | tuple[Response, int]:
    """Transcribe the WAV file in the request body."""
    try:
        samples = read_wav(request.get_data())
    except (wave.Error, ValueError, EOFError) as error:
        return jsonify(detail=f"send a 16-bit PCM WAV file: {error}"), 400
    net = get_model(speech.name)  # 503 with the status until Whisper is ready
    options: dict[str, Any] = {"fp16": False, "temperature": 0.0}
    if max_tokens := os.environ.get("MAX_TOKENS"):
        options["sample_len"] = int(max_tokens)
    result = net.transcribe(samples, condition_on_previous_text=False, **options)
    return jsonify(
        text=result["text"].strip(),
        language=result["language"],
        seconds=round(len(samples) / SAMPLE_RATE, 3),
    )


if __name__ == "__main__":
    app.run(host=os.environ.get("HOST", "127.0.0.1"), port=int(os.environ.get("PORT", "5000")))
