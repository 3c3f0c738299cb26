"""A vision-language model as a judge, behind any OpenAI-compatible chat-completions server.

vLLM and SGLang serve UnifiedReward, Qwen2.5-VL and the like with ``POST {url}/chat/completions``.
For every clip, ``frames`` frames (evenly spaced, first and last included) go as PNG data URLs in one
user message with the prompt text; the first number in the reply, divided by ``max_score``, is the
reward. Requests run in a bounded thread pool with a timeout each and retries with exponential
backoff on connection errors, timeouts, HTTP 429 and 5xx. Only the standard library is used.

Errors are one line naming the URL: the server is down or keeps failing, replies with another HTTP
error, or replies without a number.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from euphonium.rewards.base import Reward, register_reward

DEFAULT_PROMPT_TEMPLATE = (
    "You are shown {frames} frames sampled evenly from a generated video. The video was generated from this "
    'text prompt: "{prompt}". Rate how well the video matches the prompt and how good it looks, as one '
    "number from 0 to {max_score}. Reply with the number first."
)

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class VLMJudgeError(RuntimeError):
    """The judge server could not give a score (down, an HTTP error, or a reply without a number)."""


def first_number(text: str) -> Optional[float]:
    """The first decimal number in ``text`` (``"Score: 7/10"`` -> 7.0), or None."""
    match = _NUMBER.search(text)
    return float(match.group(0)) if match else None


def frame_indices(num_frames: int, k: int) -> List[int]:
    """``k`` evenly spaced indices in ``[0, num_frames)``, first and last included (all when ``k >= num_frames``)."""
    if k >= num_frames:
        return list(range(num_frames))
    if k == 1:
        return [num_frames // 2]
    return [round(i * (num_frames - 1) / (k - 1)) for i in range(k)]


def png_data_url(frame: np.ndarray) -> str:
    """``[H, W, C]`` uint8 (C = 1 or 3) -> ``data:image/png;base64,...``."""
    image = Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class VLMJudge(Reward):
    """``r[b] = first_number(reply(frames_b, prompt_b)) / max_score`` from a chat-completions server.

    Args:
        url: the server's OpenAI-compatible base URL, e.g. ``http://127.0.0.1:8000/v1`` (requests go to
            ``{url}/chat/completions``).
        model: the served model name (the request's ``model``).
        max_score: the top of the scale the prompt asks for; the reply's number is divided by it.
        prompt_template: the text sent with the frames; ``{prompt}`` is the clip's prompt, ``{frames}``
            the number of frames and ``{max_score}`` the scale (other braces must be doubled).
        frames: frames sent per clip (evenly spaced).
        max_concurrency: requests in flight at once.
        timeout: seconds per request.
        retries: further attempts after a connection error, timeout, 429 or 5xx (backoff
            ``backoff * 2**attempt`` seconds).
        max_tokens, temperature: sent with the request (temperature 0: a deterministic judge).
        api_key: sent as ``Authorization: Bearer ...`` when given.
        clip_scores: clamp the reward into ``[0, 1]`` (a judge may answer outside its scale).
    """

    name = "vlm_judge"

    def __init__(
        self,
        url: str,
        model: str,
        *,
        max_score: float = 10.0,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        frames: int = 4,
        max_concurrency: int = 8,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_tokens: int = 64,
        temperature: float = 0.0,
        api_key: Optional[str] = None,
        clip_scores: bool = False,
    ):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url must be an http(s) URL of an OpenAI-compatible server, got {url!r}")
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be the served model's name, got {model!r}")
        if isinstance(max_score, bool) or not isinstance(max_score, (int, float)) or not 0 < max_score < math.inf:
            raise ValueError(f"max_score must be a positive number, got {max_score!r}")
        for arg, value, low in (
            ("frames", frames, 1),
            ("max_concurrency", max_concurrency, 1),
            ("retries", retries, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{arg} must be an integer >= {low}, got {value!r}")
        for arg, value in (("timeout", timeout), ("backoff", backoff)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"{arg} must be a non-negative number of seconds, got {value!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        try:
            prompt_template.format(prompt="p", frames=1, max_score=1)
        except (KeyError, IndexError, ValueError, AttributeError) as err:
            raise ValueError(
                f"prompt_template may use only {{prompt}}, {{frames}} and {{max_score}} (got {err!r}); "
                "double other braces"
            ) from None
        self.url = url.rstrip("/")
        self.endpoint = self.url + "/chat/completions"
        self.model = model
        self.max_score = float(max_score)
        self.prompt_template = prompt_template
        self.frames = frames
        self.max_concurrency = max_concurrency
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.api_key = api_key
        self.clip_scores = clip_scores

    def request_body(self, frames: Sequence[np.ndarray], prompt: str) -> dict:
        """The chat-completions request for one clip: the frames as image URLs, then the text."""
        text = self.prompt_template.format(prompt=prompt, frames=len(frames), max_score=_plain(self.max_score))
        content = [{"type": "image_url", "image_url": {"url": png_data_url(f)}} for f in frames]
        content.append({"type": "text", "text": text})
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }

    def _post(self, body: dict) -> str:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = response.read()
            except urllib.error.HTTPError as err:
                detail = err.read()[:200].decode("utf-8", "replace").replace("\n", " ")
                last = f"HTTP {err.code} {err.reason}: {detail}".strip()
                if err.code in _RETRY_STATUS:
                    continue
                raise VLMJudgeError(f"vlm_judge: {self.endpoint} answered {last}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                reason = getattr(err, "reason", err)
                last = f"{type(reason).__name__}: {reason}"
                continue
            try:
                reply = json.loads(payload)["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                snippet = payload[:200].decode("utf-8", "replace").replace("\n", " ")
                raise VLMJudgeError(
                    f"vlm_judge: {self.endpoint} returned no chat completion (got {snippet!r})"
                ) from None
            if isinstance(reply, list):  # some servers return content parts
                reply = " ".join(p.get("text", "") for p in reply if isinstance(p, dict))
            return reply if isinstance(reply, str) else ""
        raise VLMJudgeError(
            f"vlm_judge: cannot reach {self.endpoint} after {self.retries + 1} attempts ({last}); is the server up?"
        )

    def score_one(self, frames: Sequence[np.ndarray], prompt: str) -> float:
        reply = self._post(self.request_body(frames, prompt))
        value = first_number(reply)
        if value is None:
            short = reply.strip().replace("\n", " ")[:120]
            raise VLMJudgeError(f"vlm_judge: the reply of {self.endpoint} has no number: {short!r}")
        score = value / self.max_score
        return min(max(score, 0.0), 1.0) if self.clip_scores else score

    def compute(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        b, f, c = videos.shape[:3]
        if c not in (1, 3):
            raise ValueError(f"videos must have 1 or 3 channels for the judge, got shape {tuple(videos.shape)}")
        idx = frame_indices(f, self.frames)
        pixels = (videos.detach()[:, idx].float() * 255).round().clamp(0, 255).to(torch.uint8)
        pixels = pixels.permute(0, 1, 3, 4, 2).cpu().numpy()  # [B, K, H, W, C]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, b)) as pool:
            scores = list(pool.map(lambda i: self.score_one(list(pixels[i]), prompts[i]), range(b)))
        return torch.tensor(scores, dtype=torch.float32, device=videos.device)

    def __repr__(self) -> str:
        return f"VLMJudge(url={self.url!r}, model={self.model!r}, max_score={self.max_score}, frames={self.frames})"


def _plain(x: float):
    return int(x) if float(x).is_integer() else x


register_reward(VLMJudge.name, VLMJudge)
