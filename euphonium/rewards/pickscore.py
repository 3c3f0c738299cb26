"""PickScore (Kirstain et al., 2023): a CLIP-H fine-tuned on Pick-a-Pic human preferences.

Scoring as in the official code: ``logit_scale.exp() * cos(E_img(image), E_txt(prompt))`` with
``transformers.CLIPModel`` (``yuvalkirstain/PickScore_v1``) and the processor of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (shorter side to 224, bicubic, centre crop 224, CLIP's
mean and std; the CLIP BPE tokenizer, at most 77 tokens). A clip scores the mean over its frames, so
values keep PickScore's per-image scale (about 18-23 for real images; the logit scale is ~100).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from euphonium.rewards._vision import ClipTower, rgb_frames
from euphonium.rewards.base import Reward, register_reward


class PickScore(Reward):
    """``r[b] = exp(logit_scale) * mean_f cos(E_img(frame_{b,f}), E_txt(prompt_b))``.

    Args:
        path: local copy of ``yuvalkirstain/PickScore_v1`` (a ``CLIPModel`` folder: ``config.json`` and weights).
        processor_path: folder with ``preprocessor_config.json`` and the CLIP tokenizer (a local copy of
            ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` without its weights will do); default ``path``.
        device, dtype: where and in which dtype the model runs (default CPU, float32); the score comes
            back as float32 on the videos' device.
        frame_batch_size: frames per vision forward pass.

    Differentiable in the pixels when called with grad enabled (the parameters are frozen).
    """

    name = "pickscore"

    def __init__(
        self,
        path: Union[str, Path],
        *,
        processor_path: Optional[Union[str, Path]] = None,
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype = torch.float32,
        frame_batch_size: int = 64,
    ):
        self.clip = ClipTower(
            "path", path, processor_path, device=device, dtype=dtype, frame_batch_size=frame_batch_size
        )

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.model.logit_scale.detach().float().exp()

    def compute(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        b, f = videos.shape[:2]
        image = self.clip.image_embeddings(rgb_frames(videos, "PickScore")).view(b, f, -1)
        text = self.clip.text_embeddings(prompts)
        cosine = (image * text[:, None, :]).sum(-1).mean(dim=1)
        return (self.logit_scale * cosine).to(videos.device)


register_reward(PickScore.name, PickScore)
