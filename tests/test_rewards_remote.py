"""Reward server and `remote` client over real loopback HTTP."""
from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from dgpo.cli import build_parser
from dgpo.rewards import get_reward
from dgpo.rewards.remote import RewardServer, encode_images
from dgpo.shapes import prompts as shape_prompts
from dgpo.shapes.prompts import scene_for_spec
from dgpo.shapes.world import render_scene


class Recorder:
    """Wraps a reward: records batch sizes, fails the first ``failures`` calls, optionally sleeps."""

    def __init__(self, reward, failures: int = 0, sleep: float = 0.0):
        self.reward, self.failures, self.sleep, self.batches = reward, failures, sleep, []

    def __call__(self, images, prompts, metadata):
        self.batches.append(len(prompts))
        time.sleep(self.sleep)
        if len(self.batches) <= self.failures:
            raise RuntimeError("model not ready")
        return self.reward(images, prompts, metadata)


@pytest.fixture
def serve():
    servers = []

    def start(reward, name="shapes_partial"):
        server = RewardServer(reward, name, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def shapes_batch():
    specs = shape_prompts.test_specs()[:7]
    rng = np.random.default_rng(0)
    images = torch.stack([torch.from_numpy(np.array(render_scene(scene_for_spec(s, rng)))).permute(2, 0, 1).float() / 255 for s in specs])
    metadata = [s.to_metadata() for s in specs]
    metadata[3] = {}  # not applicable -> NaN, which must survive the JSON round trip
    return images, [s.prompt for s in specs], metadata


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/score", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_round_trip_equals_local_scores_in_batches(serve, shapes_batch):
    images, prompts, metadata = shapes_batch
    local = get_reward("shapes_partial")
    recorder = Recorder(local)
    server = serve(recorder)
    remote = get_reward("remote", url=server.url, reward="shapes_partial", batch_size=3)
    expected = local(images, prompts, metadata)
    assert np.isnan(expected[3]) and np.isfinite(expected[[0, 1, 2, 4, 5, 6]]).all()
    np.testing.assert_array_equal(remote(images, prompts, metadata), expected)
    assert recorder.batches == [3, 3, 1]


def test_health_and_bad_requests(serve, shapes_batch):
    images, prompts, metadata = shapes_batch
    server = serve(get_reward("shapes_partial"))
    with urllib.request.urlopen(f"{server.url}/health", timeout=10) as response:
        assert json.loads(response.read()) == {"version": 1, "reward": "shapes_partial", "status": "ok"}
    good = {"version": 1, "images": encode_images(images[:2]), "prompts": prompts[:2], "metadata": metadata[:2]}
    status, body = _post(server.url, good)
    assert status == 200 and body["scores"] == get_reward("shapes_partial")(images[:2], prompts[:2], metadata[:2]).tolist()
    for bad, message in [
        ({**good, "version": 2}, "unsupported schema version 2"),
        ({**good, "prompts": prompts[:1]}, "2 images, 1 prompts and 2 metadata entries"),
        ({**good, "images": ["not base64!"]*2}, "images must be base64 PNGs"),
        ({**good, "images": encode_images(images[:1]) + encode_images(torch.zeros(1, 3, 8, 8))}, "images must be base64 PNGs of one size"),
    ]:
        status, body = _post(server.url, bad)
        assert status == 400 and message in body["error"], body


def test_server_down_fails_after_bounded_retries():
    url = f"http://127.0.0.1:{_free_port()}"
    remote = get_reward("remote", url=url, reward="ocr", retries=2, backoff=0.1, timeout=2)
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        remote(torch.zeros(1, 3, 8, 8), ['"a"'], [{}])
    elapsed = time.monotonic() - start
    assert f"remote reward 'ocr' at {url} failed after 3 attempts" in str(info.value)
    assert "Connection refused" in str(info.value)
    assert 0.3 <= elapsed < 5, "backoff 0.1 s then 0.2 s, no more"


def test_server_error_is_retried_until_it_recovers(serve, shapes_batch):
    images, prompts, metadata = shapes_batch
    recorder = Recorder(get_reward("shapes_partial"), failures=2)
    server = serve(recorder)
    remote = get_reward("remote", url=server.url, retries=2, backoff=0.01)
    np.testing.assert_array_equal(remote(images, prompts, metadata), get_reward("shapes_partial")(images, prompts, metadata))
    assert recorder.batches == [7, 7, 7]


def test_persistent_server_error_reports_the_server_message(serve, shapes_batch):
    images, prompts, metadata = shapes_batch
    recorder = Recorder(get_reward("shapes_partial"), failures=10)
    server = serve(recorder)
    with pytest.raises(RuntimeError, match=r"failed after 2 attempts: HTTP 500: .*reward 'shapes_partial' failed: RuntimeError: model not ready"):
        get_reward("remote", url=server.url, retries=1, backoff=0.01)(images, prompts, metadata)
    assert len(recorder.batches) == 2


def test_timeout_is_retried_then_reported(serve):
    server = serve(Recorder(lambda images, prompts, metadata: [0.0] * len(prompts), sleep=1.0))
    remote = get_reward("remote", url=server.url, retries=1, backoff=0.01, timeout=0.2)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="failed after 2 attempts: .*timed out"):
        remote(torch.zeros(1, 3, 8, 8), ["p"], [{}])
    assert time.monotonic() - start < 1.0


def test_client_errors_and_wrong_reward_are_not_retried(serve, shapes_batch):
    images, prompts, metadata = shapes_batch
    recorder = Recorder(get_reward("shapes_partial"))
    server = serve(recorder)
    with pytest.raises(RuntimeError, match=r"rejected the request: HTTP 404"):
        get_reward("remote", url=f"{server.url}/wrong", backoff=10)(images, prompts, metadata)
    with pytest.raises(RuntimeError, match=r"remote reward 'ocr' at .* answered with schema 1 for reward 'shapes_partial'"):
        get_reward("remote", url=server.url, reward="ocr")(images, prompts, metadata)
    assert recorder.batches == [7]


def test_remote_needs_a_url(monkeypatch):
    monkeypatch.delenv("DGPO_REMOTE_URL", raising=False)
    with pytest.raises(RuntimeError, match="DGPO_REMOTE_URL"):
        get_reward("remote")


def test_serve_reward_command(shapes_batch):
    """`dgpo serve-reward` in a subprocess, used through DGPO_REMOTE_URL as the trainer would."""
    args = build_parser().parse_args(["serve-reward", "pickscore", "--option", "batch_size=8", "--option", "model=/weights/pick"])
    assert (args.name, args.host, args.port) == ("pickscore", "127.0.0.1", 8000)
    assert args.option == [("batch_size", 8), ("model", "/weights/pick")], "JSON values are typed, others stay strings"
    images, prompts, metadata = shapes_batch
    command = [sys.executable, "-m", "dgpo.cli", "serve-reward", "shapes_partial", "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 60)
        assert ready, "server did not start within 60 s"
        line = process.stdout.readline()
        url = line.split(" on ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:"), line
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DGPO_REMOTE_URL", url)
            scores = get_reward("remote")(images, prompts, metadata)
        np.testing.assert_array_equal(scores, get_reward("shapes_partial")(images, prompts, metadata))
    finally:
        process.terminate()
        process.wait(timeout=10)
