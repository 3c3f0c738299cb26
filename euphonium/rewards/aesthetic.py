"""The LAION aesthetic predictor v2 ("improved aesthetic predictor", Schuhmann et al.).

An MLP on the unit-normalised CLIP ViT-L/14 image embedding, trained on SAC + LAION-Logos + AVA
ratings (1-10). The MLP is five linear layers with dropout in between and no activation
(768 -> 1024 -> 128 -> 64 -> 16 -> 1, state-dict keys ``layers.{0,2,4,6,7}.{weight,bias}``), as in
the official ``sac+logos+ava1-l14-linearMSE.pth``. The embedding is OpenAI CLIP ViT-L/14's
``encode_image`` (here ``transformers.CLIPModel.get_image_features`` of ``openai/clip-vit-large-patch14``)
divided by its L2 norm. Per frame, averaged over the frames of a clip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from euphonium.rewards._vision import ClipTower, load_into, load_weights, local_dir, rgb_frames
from euphonium.rewards.base import Reward, register_reward

AESTHETIC_WEIGHTS = "sac+logos+ava1-l14-linearMSE.pth"


class AestheticMLP(nn.Module):
    """The predictor's head: ``Linear(d, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout,
    Linear(64, 16), Linear(16, 1)`` (no activations, as released)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


class AestheticScore(Reward):
    """``r[b] = mean_f MLP(E_img(frame_{b,f}) / ||E_img||)``, on the predictor's 1-10 scale.

    Args:
        path: folder holding the predictor's weights (``weights``, default the official
            ``sac+logos+ava1-l14-linearMSE.pth``; a ``.safetensors`` file with the same keys works) and,
            unless ``clip_path`` is given, a ``clip/`` subfolder with CLIP ViT-L/14.
        clip_path: a ``CLIPModel`` folder (``save_pretrained`` layout with ``preprocessor_config.json``),
            e.g. a local copy of ``openai/clip-vit-large-patch14``.
        weights: the predictor's file name inside ``path``.
        device, dtype, frame_batch_size: as for :class:`~euphonium.rewards.clip.ClipScore`.
    """

    name = "aesthetic"

    def __init__(
        self,
        path: Union[str, Path],
        *,
        clip_path: Optional[Union[str, Path]] = None,
        weights: str = AESTHETIC_WEIGHTS,
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype = torch.float32,
        frame_batch_size: int = 64,
    ):
        path = local_dir("path", path, f"the aesthetic predictor's weights ({AESTHETIC_WEIGHTS}) and a clip/ folder")
        weights_path = path / weights
        state = load_weights("weights", weights_path)
        clip_arg = "clip_path" if clip_path is not None else "path"
        clip_path = clip_path if clip_path is not None else path / "clip"
        self.clip = ClipTower(
            clip_arg, clip_path, device=device, dtype=dtype, text=False, frame_batch_size=frame_batch_size
        )
        dim = int(self.clip.model.config.projection_dim)
        self.mlp = AestheticMLP(dim)
        load_into("weights", weights_path, self.mlp, state)
        self.mlp.to(self.clip.device).eval().requires_grad_(False)

    def compute(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        b, f = videos.shape[:2]
        image = self.clip.image_embeddings(rgb_frames(videos, "the aesthetic predictor"))
        scores = self.mlp(image).view(b, f).mean(dim=1)
        return scores.to(videos.device)


register_reward(AestheticScore.name, AestheticScore)
