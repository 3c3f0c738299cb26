"""CLIP text-video score: cosine similarity of CLIP image and text embeddings, averaged over frames.

The model is a ``transformers.CLIPModel`` loaded from a local folder (``save_pretrained`` layout:
``config.json`` + weights, a tokenizer, and ``preprocessor_config.json``); the hub is never
contacted. Frames are preprocessed in PyTorch the way ``CLIPImageProcessor`` does it (resize the
shortest side with bicubic interpolation, centre crop, normalise with the folder's mean and std),
so the score is differentiable in the pixels and runs on the model's device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence, Union

import torch
import torch.nn.functional as F

from euphonium._checks import check_float, check_int, check_path
from euphonium.rewards.base import Reward, register_reward


def _features(out) -> torch.Tensor:
    # transformers < 5 returns the projected embedding; >= 5 a model output whose pooler_output holds it.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _edge(value, key: str) -> int:
    return int(value[key]) if isinstance(value, dict) else int(value)


class ClipScore(Reward):
    """``r[b] = scale * mean_f cos(E_img(frame_{b,f}), E_txt(prompt_b))`` with a local CLIP model.

    Args:
        path: folder of a ``CLIPModel`` saved with ``save_pretrained`` (with its tokenizer and
            ``preprocessor_config.json``), e.g. a local copy of ``openai/clip-vit-large-patch14``.
        device: where CLIP runs (default: the CPU; the score comes back on the videos' device).
        dtype: CLIP's weights dtype (default float32).
        scale: multiplies the cosine (1 gives values in [-1, 1]; 100 the common "CLIPScore" scale).
        frame_batch_size: frames per vision forward pass (bounds memory on long clips).

    Videos are ``[B, F, 3, H, W]`` in [0, 1]; the result is ``[B]`` float32. Gradients flow to the
    pixels when called with grad enabled (the parameters are frozen).
    """

    name = "clip_score"

    def __init__(
        self,
        path: Union[str, Path],
        *,
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype = torch.float32,
        scale: float = 1.0,
        frame_batch_size: int = 64,
    ):
        from transformers import AutoTokenizer, CLIPModel

        path = check_path("path", path, kind="dir")
        if not (path / "config.json").is_file():
            raise ValueError(
                f"path must be a local folder holding a CLIPModel saved with save_pretrained "
                f"(config.json, weights, tokenizer, preprocessor_config.json), got {str(path)!r}"
            )
        if not (path / "preprocessor_config.json").is_file():
            raise ValueError(
                f"path {str(path)!r} has no preprocessor_config.json (save the CLIPImageProcessor next to the model)"
            )
        scale = check_float("scale", scale)
        check_int("frame_batch_size", frame_batch_size, minimum=1)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(self.device, dtype).eval()
        self.model.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        pre = json.loads((path / "preprocessor_config.json").read_text())
        self.resize_to = _edge(pre.get("size", 224), "shortest_edge")
        crop = pre.get("crop_size", self.resize_to)
        self.crop = (_edge(crop, "height"), _edge(crop, "width"))
        self.center_crop = bool(pre.get("do_center_crop", True))
        self.mean = torch.tensor(pre["image_mean"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(pre["image_std"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.dtype = dtype
        self.scale = float(scale)
        self.frame_batch_size = frame_batch_size
        self.max_length = min(
            int(self.tokenizer.model_max_length), int(self.model.config.text_config.max_position_embeddings)
        )

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` in [0, 1] -> CLIP pixel values ``[N, 3, crop_h, crop_w]`` (resize, crop, normalise)."""
        h, w = frames.shape[-2:]
        factor = self.resize_to / min(h, w)
        size = (max(self.crop[0], round(h * factor)), max(self.crop[1], round(w * factor)))
        frames = F.interpolate(frames.float(), size=size, mode="bicubic", align_corners=False, antialias=factor < 1)
        if self.center_crop:
            top, left = (size[0] - self.crop[0]) // 2, (size[1] - self.crop[1]) // 2
            frames = frames[:, :, top : top + self.crop[0], left : left + self.crop[1]]
        return (frames - self.mean) / self.std

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm CLIP text embeddings ``[B, D]`` float32."""
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        text = _features(
            self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask"))
        )
        return F.normalize(text.float(), dim=-1)

    def compute(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        b, f, c, _, _ = videos.shape
        if c != 3:
            raise ValueError(f"videos must be RGB ([B, F, 3, H, W]) for CLIP, got shape {tuple(videos.shape)}")
        frames = videos.to(self.device).reshape(b * f, *videos.shape[2:])
        image = torch.cat(
            [
                _features(self.model.get_image_features(pixel_values=self.preprocess(chunk).to(self.dtype)))
                for chunk in frames.split(self.frame_batch_size)
            ]
        )
        image = F.normalize(image.float(), dim=-1).view(b, f, -1)
        text = self.text_embeddings(prompts)
        cosine = (image * text[:, None, :]).sum(-1).mean(dim=1)
        return (self.scale * cosine).to(videos.device)


register_reward(ClipScore.name, ClipScore)
