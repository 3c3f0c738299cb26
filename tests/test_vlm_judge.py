"""vlm_judge against a stub OpenAI-compatible chat-completions server on 127.0.0.1 (no network beyond loopback)."""

import base64
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from euphonium.rewards.base import build_reward
from euphonium.rewards.vlm_judge import VLMJudge, VLMJudgeError, first_number, frame_indices


class StubJudge:
    """A chat-completions server whose reply is ``reply(body)``; records every request body and the peak concurrency."""

    def __init__(self, reply, status=None, delay=0.0):
        self.reply, self.status, self.delay = reply, status, delay
        self.bodies, self.paths = [], []
        self.in_flight = self.peak = 0
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.bodies.append(body)
                    stub.paths.append(self.path)
                    stub.in_flight += 1
                    stub.peak = max(stub.peak, stub.in_flight)
                    attempt = len(stub.bodies)
                try:
                    time.sleep(stub.delay)
                    code = stub.status(attempt) if stub.status else 200
                    if code != 200:
                        payload = b'{"error": "busy"}'
                    else:
                        message = {"role": "assistant", "content": stub.reply(body)}
                        payload = json.dumps({"choices": [{"index": 0, "message": message}]}).encode()
                finally:
                    # Before the reply goes out: the client's next request may arrive as soon as it has
                    # the reply, before this thread runs again, and must not count as concurrent with it.
                    with stub.lock:
                        stub.in_flight -= 1
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def prompt_text(body):
    return [p["text"] for p in body["messages"][0]["content"] if p["type"] == "text"][0]


def images(body):
    out = []
    for part in body["messages"][0]["content"]:
        if part["type"] == "image_url":
            url = part["image_url"]["url"]
            assert url.startswith("data:image/png;base64,")
            out.append(np.array(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))))
    return out


def clips(b=3, f=6, h=8, w=10):
    return torch.rand(b, f, 3, h, w)


def test_scores_are_the_replies_first_number_over_max_score():
    # The stub answers with the digit in the prompt ("clip 7" -> "Score: 7 out of 10. Looks fine").
    def reply(body):
        digit = prompt_text(body).split("clip ")[1][0]
        return f"Score: {digit} out of 10. Looks fine"

    v = clips(b=4)
    p = ["clip 7", "clip 0", "clip 9", "clip 3"]
    with StubJudge(reply) as stub:
        judge = build_reward(
            "vlm_judge", url=stub.url, model="unified-reward", max_score=10, prompt_template="Rate {prompt}", frames=3
        )
        score = judge(v, p)
    torch.testing.assert_close(score, torch.tensor([0.7, 0.0, 0.9, 0.3]))
    assert score.dtype == torch.float32 and score.shape == (4,)
    assert stub.paths == ["/v1/chat/completions"] * 4
    body = next(b for b in stub.bodies if prompt_text(b) == "Rate clip 9")
    assert body["model"] == "unified-reward" and body["messages"][0]["role"] == "user"
    # K = 3 frames of clip 2, evenly spaced (0, 2/3 of the way rounded, last), as exact uint8 PNGs.
    sent = images(body)
    assert len(sent) == 3
    expected = (v[2, [0, 2, 5]] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(np.stack(sent), expected)


def test_concurrency_is_bounded():
    with StubJudge(lambda body: "5", delay=0.1) as stub:
        judge = VLMJudge(stub.url, "m", max_concurrency=2, frames=1)
        score = judge(clips(b=6, f=2), [f"p{i}" for i in range(6)])
    torch.testing.assert_close(score, torch.full((6,), 0.5))
    assert len(stub.bodies) == 6 and stub.peak == 2


def test_retries_with_backoff_then_succeeds():
    status = lambda attempt: 503 if attempt <= 2 else 200  # noqa: E731 - two failures, then an answer
    with StubJudge(lambda body: "8/10", status=status) as stub:
        judge = VLMJudge(stub.url, "m", retries=2, backoff=0.05, frames=1)
        start = time.perf_counter()
        score = judge(clips(b=1), ["x"])
        elapsed = time.perf_counter() - start
    torch.testing.assert_close(score, torch.tensor([0.8]))
    assert len(stub.bodies) == 3
    assert elapsed >= 0.05 + 0.1  # backoff 0.05, then 0.1


def test_gives_up_after_retries_naming_the_url():
    with StubJudge(lambda body: "8", status=lambda attempt: 503) as stub:
        judge = VLMJudge(stub.url, "m", retries=1, backoff=0.01, frames=1)
        with pytest.raises(VLMJudgeError, match=r"cannot reach http://127\.0\.0\.1:\d+/v1/chat/completions after 2"):
            judge(clips(b=1), ["x"])
    assert len(stub.bodies) == 2


def test_client_error_is_not_retried():
    with StubJudge(lambda body: "8", status=lambda attempt: 400) as stub:
        judge = VLMJudge(stub.url, "m", retries=3, backoff=0.01, frames=1)
        with pytest.raises(VLMJudgeError, match=r"/v1/chat/completions answered HTTP 400"):
            judge(clips(b=1), ["x"])
    assert len(stub.bodies) == 1


def test_reply_without_a_number_is_an_error():
    with StubJudge(lambda body: "I cannot rate this video.") as stub:
        judge = VLMJudge(stub.url, "m", frames=1)
        with pytest.raises(VLMJudgeError, match=r"reply of http://127\.0\.0\.1:\d+/v1/chat/completions has no number"):
            judge(clips(b=2), ["a", "b"])


def test_server_down_is_one_line_naming_the_url():
    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = VLMJudge(f"http://127.0.0.1:{port}/v1/", "m", retries=1, backoff=0.01, timeout=2)
    with pytest.raises(VLMJudgeError) as info:
        judge(clips(b=1), ["x"])
    message = str(info.value)
    assert f"http://127.0.0.1:{port}/v1/chat/completions" in message and "\n" not in message


def test_timeout_counts_as_a_failed_attempt():
    with StubJudge(lambda body: "9", delay=1.0) as stub:
        judge = VLMJudge(stub.url, "m", retries=0, timeout=0.2, frames=1)
        with pytest.raises(VLMJudgeError, match="after 1 attempts"):
            judge(clips(b=1), ["x"])


def test_scale_clipping_and_default_template():
    with StubJudge(lambda body: "12") as stub:
        raw = VLMJudge(stub.url, "m", frames=2)(clips(b=1), ["a red square"])
        clipped = VLMJudge(stub.url, "m", frames=2, clip_scores=True)(clips(b=1), ["a red square"])
    torch.testing.assert_close(raw, torch.tensor([1.2]))
    torch.testing.assert_close(clipped, torch.tensor([1.0]))
    text = prompt_text(stub.bodies[0])
    assert '"a red square"' in text and "0 to 10" in text and "2 frames" in text


def test_helpers_and_argument_checks():
    assert first_number("Score: 7/10") == 7.0 and first_number("**8.5**") == 8.5 and first_number("none") is None
    assert first_number("-2 points") == -2.0
    assert frame_indices(16, 4) == [0, 5, 10, 15] and frame_indices(3, 8) == [0, 1, 2] and frame_indices(9, 1) == [4]
    with pytest.raises(ValueError, match="url must be an http"):
        VLMJudge("localhost:8000", "m")
    with pytest.raises(ValueError, match="frames must be an integer"):
        VLMJudge("http://127.0.0.1:1/v1", "m", frames=0)
    with pytest.raises(ValueError, match="max_score must be a positive"):
        VLMJudge("http://127.0.0.1:1/v1", "m", max_score=0)
    with pytest.raises(ValueError, match="prompt_template may use only"):
        VLMJudge("http://127.0.0.1:1/v1", "m", prompt_template="{score}")
