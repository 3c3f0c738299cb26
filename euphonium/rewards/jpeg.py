"""DDPO's JPEG compressibility and incompressibility rewards, per frame and averaged over frames.

DDPO (Black et al., 2023) scores an image by the size of its JPEG encoding at quality 95, in
kilobytes (1000 bytes): incompressibility is ``+size``, compressibility is ``-size``. For a clip each
frame is encoded on its own (uint8 after ``round(255 * x)``) and the sizes are averaged, so the values
keep DDPO's scale whatever the number of frames.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from euphonium._checks import check_int
from euphonium.rewards.base import Reward, check_videos, register_reward


def jpeg_size_kb(videos: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Mean JPEG size in kB over the frames of each clip: ``[B, F, C, H, W]`` in [0, 1] -> ``[B]`` float32.

    ``C`` is 1 (grey) or 3 (RGB). Frames are quantised as ``clamp(round(255 * x), 0, 255)``.
    """
    check_int("quality", quality, minimum=1, maximum=100)
    check_videos(videos)
    b, f, c, h, w = videos.shape
    if c not in (1, 3):
        raise ValueError(f"videos must have 1 or 3 channels for JPEG, got shape {tuple(videos.shape)} (C={c})")
    frames = (videos.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    frames = frames.permute(0, 1, 3, 4, 2).cpu().numpy()  # [B, F, H, W, C] for Pillow
    sizes = np.empty((b, f), dtype=np.float64)
    for i in range(b):
        for j in range(f):
            frame = frames[i, j, :, :, 0] if c == 1 else frames[i, j]
            buffer = io.BytesIO()
            Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
            sizes[i, j] = buffer.tell() / 1000
    return torch.as_tensor(sizes.mean(axis=1), dtype=torch.float32, device=videos.device)


class JpegIncompressibility(Reward):
    """``r = mean_frames(jpeg_size_kb)``: rewards detail and texture (DDPO's ``jpeg_incompressibility``)."""

    name = "jpeg_incompressibility"

    def __init__(self, quality: int = 95):
        self.quality = check_int("quality", quality, minimum=1, maximum=100)

    def compute(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return jpeg_size_kb(videos, self.quality)


class JpegCompressibility(Reward):
    """``r = -mean_frames(jpeg_size_kb)``: rewards flat, simple frames (DDPO's ``jpeg_compressibility``)."""

    name = "jpeg_compressibility"

    def __init__(self, quality: int = 95):
        self.quality = check_int("quality", quality, minimum=1, maximum=100)

    def compute(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return -jpeg_size_kb(videos, self.quality)


register_reward(JpegIncompressibility.name, JpegIncompressibility)
register_reward(JpegCompressibility.name, JpegCompressibility)
