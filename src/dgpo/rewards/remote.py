"""Rewards over HTTP: a server exposing any registered reward, and the ``remote`` client reward.

A reward model too big or too awkward to load next to the trainer (another GPU, another Python
environment) runs behind ``dgpo serve-reward NAME``; the trainer names ``remote`` and points
it at the server. Standard library only. Schema version 1:

    POST /score  {"version": 1, "images": [base64 PNG, ...], "prompts": [...], "metadata": [{...}, ...]}
              -> {"version": 1, "reward": NAME, "scores": [float or null, ...]}   (null = NaN)
    GET /health  -> {"version": 1, "reward": NAME, "status": "ok"}

Errors are ``{"error": message}`` with status 400 (bad request: not retried) or 500 (the reward
raised: retried, since a server under load or restarting recovers). Images travel as 8-bit PNG,
so a remote score equals the local score of the image rounded to 8 bits.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import UserError
from ..requirements import Setting
from .base import as_scores, get_reward, register_reward, to_pil_images

SCHEMA_VERSION = 1
URL = Setting("url", "DGPO_REMOTE_URL")


def encode_images(images: torch.Tensor) -> list[str]:
    def png(image: Image.Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    return [png(image) for image in to_pil_images(images)]


def decode_images(strings: list[str]) -> torch.Tensor:
    arrays = [np.array(Image.open(io.BytesIO(base64.b64decode(s, validate=True))).convert("RGB")) for s in strings]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def parse_request(request: dict) -> tuple[torch.Tensor, list[str], list[dict]]:
    """The reward arguments of a /score request; ValueError says what is wrong with it."""
    if request.get("version") != SCHEMA_VERSION:
        raise ValueError(f"unsupported schema version {request.get('version')!r} (this server speaks {SCHEMA_VERSION})")
    images, prompts = request.get("images"), request.get("prompts")
    metadata = request.get("metadata") or [{} for _ in prompts or []]
    if not isinstance(images, list) or not images or not isinstance(prompts, list) or not isinstance(metadata, list):
        raise ValueError("'images' (non-empty), 'prompts' and 'metadata' must be lists")
    if not len(images) == len(prompts) == len(metadata):
        raise ValueError(f"{len(images)} images, {len(prompts)} prompts and {len(metadata)} metadata entries")
    try:
        return decode_images(images), [str(p) for p in prompts], metadata
    except (binascii.Error, UnidentifiedImageError, ValueError, RuntimeError) as exc:
        raise ValueError(f"images must be base64 PNGs of one size: {exc}") from exc


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps({"version": SCHEMA_VERSION, "reward": self.server.reward_name, **body}, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path != "/health":
            return self._reply(404, {"error": f"no such endpoint {self.path}"})
        self._reply(200, {"status": "ok"})

    def do_POST(self) -> None:
        if self.path != "/score":
            return self._reply(404, {"error": f"no such endpoint {self.path}"})
        try:
            images, prompts, metadata = parse_request(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        except (ValueError, TypeError) as exc:  # TypeError: no Content-Length
            return self._reply(400, {"error": f"bad request: {exc}"})
        try:
            with self.server.lock:  # one batch at a time: reward models are neither thread-safe nor small
                scores = as_scores(self.server.reward(images, prompts, metadata), len(prompts), self.server.reward_name)
        except Exception as exc:
            return self._reply(500, {"error": f"reward {self.server.reward_name!r} failed: {type(exc).__name__}: {exc}"})
        self._reply(200, {"scores": [float(s) if math.isfinite(s) else None for s in scores]})


class RewardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, reward, name: str, host: str = "127.0.0.1", port: int = 0):
        self.reward, self.reward_name, self.lock = reward, name, threading.Lock()
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def serve(name: str, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Load reward ``name`` once and serve it until interrupted (``dgpo serve-reward``)."""
    server = RewardServer(get_reward(name, **options), name, host, port)
    print(f"serving reward {name!r} on {server.url} (POST /score, GET /health)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@register_reward("remote", requires=(URL,))
def remote(url: str | None = None, reward: str | None = None, batch_size: int = 16, timeout: float = 60.0, retries: int = 3, backoff: float = 1.0):
    """A reward served by `dgpo serve-reward` at $DGPO_REMOTE_URL; retries with exponential backoff."""
    url = (URL.value(url) or "").rstrip("/")
    reward = reward or os.environ.get("DGPO_REMOTE_REWARD")
    if not url:
        raise UserError("reward 'remote' needs a server URL: set DGPO_REMOTE_URL or pass url=")
    label = f"remote reward {reward!r} at {url}" if reward else f"remote reward at {url}"
    attempts = int(retries) + 1

    def post(payload: dict) -> dict:
        data = json.dumps(payload).encode()
        for attempt in range(attempts):
            if attempt:
                time.sleep(float(backoff) * 2 ** (attempt - 1))
            request = urllib.request.Request(f"{url}/score", data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=float(timeout)) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code}: {exc.read().decode(errors='replace')}"
                if exc.code < 500:
                    raise UserError(f"{label} rejected the request: {error}") from exc
            except OSError as exc:  # refused, reset, timed out (URLError and TimeoutError are OSErrors)
                error = f"{type(exc).__name__}: {exc}"
        raise UserError(f"{label} failed after {attempts} attempts: {error}")

    def score(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> np.ndarray:
        scores = []
        for start in range(0, len(prompts), int(batch_size)):
            stop = start + int(batch_size)
            body = post({"version": SCHEMA_VERSION, "images": encode_images(images[start:stop]),
                         "prompts": list(prompts[start:stop]), "metadata": list(metadata[start:stop])})
            if body.get("version") != SCHEMA_VERSION or (reward and body.get("reward") != reward):
                raise UserError(f"{label} answered with schema {body.get('version')!r} for reward {body.get('reward')!r}")
            scores.extend(body["scores"])
        return as_scores(scores, len(prompts), "remote")

    return score
