"""ImageReward (Xu et al., 2023): a BLIP text-image encoder with an MLP head, trained on human rankings.

The model is rebuilt from ``transformers``' BLIP classes: ``BlipVisionModel`` for BLIP's ViT-L/16
(``visual_encoder``) and ``BlipTextModel`` for its BERT with cross-attention (``text_encoder``, the
``med`` module), then the official ``ImageReward.pt`` state dict is loaded (vision keys renamed, text
keys as they are: transformers' BLIP text model is a port of ``med``). The ``image-reward`` package is
not used: version 1.5 imports ``apply_chunking_to_forward``, ``find_pruneable_heads_and_indices`` and
``prune_linear_layer`` from ``transformers.modeling_utils``, which transformers 5 removed, and it pins
``timm==0.6.13``, whose torchvision dependency pulls a CUDA torch.

Score as in ``ImageReward.score``: the prompt (BERT uncased tokenizer, at most 35 tokens) attends to
the image tokens; the ``[CLS]`` hidden state goes through the MLP; ``(r - 0.16717) / 1.03334``. Frames
are resized on the shorter side to 224 (bicubic), centre-cropped and normalised with CLIP's mean and
std; a clip scores the mean over its frames.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import torch

from euphonium.rewards._vision import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    center_crop,
    check_keys,
    check_positive_int,
    load_weights,
    local_dir,
    local_file,
    normalize,
    read_json,
    resize_shortest,
    resolve_device,
    rgb_frames,
    skip_init,
    strip_prefix,
)
from euphonium.rewards.aesthetic import AestheticMLP
from euphonium.rewards.base import Reward, register_reward

IMAGE_REWARD_WEIGHTS = "ImageReward.pt"
IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35


def blip_vit_to_transformers(state: Dict[str, torch.Tensor], prefix: str, layers: int) -> Dict[str, torch.Tensor]:
    """BLIP's timm-style ViT keys (``{prefix}cls_token``, ``blocks.i.attn.qkv``, ...) -> ``BlipVisionModel``'s."""
    out = {
        "embeddings.class_embedding": state[f"{prefix}cls_token"],
        "embeddings.position_embedding": state[f"{prefix}pos_embed"],
        "embeddings.patch_embedding.weight": state[f"{prefix}patch_embed.proj.weight"],
        "embeddings.patch_embedding.bias": state[f"{prefix}patch_embed.proj.bias"],
        "post_layernorm.weight": state[f"{prefix}norm.weight"],
        "post_layernorm.bias": state[f"{prefix}norm.bias"],
    }
    for i in range(layers):
        s, d = f"{prefix}blocks.{i}", f"encoder.layers.{i}"
        for a, b in (
            ("norm1", "layer_norm1"),
            ("attn.qkv", "self_attn.qkv"),
            ("attn.proj", "self_attn.projection"),
            ("norm2", "layer_norm2"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ):
            out[f"{d}.{b}.weight"] = state[f"{s}.{a}.weight"]
            out[f"{d}.{b}.bias"] = state[f"{s}.{a}.bias"]
    return out


class ImageReward(Reward):
    """``r[b] = mean_f (MLP(BLIP_text(prompt_b | ViT(frame_{b,f}))[CLS]) - mean) / std``.

    Args:
        path: folder with the official ``ImageReward.pt`` (``weights=`` names another file, ``.pt`` or
            ``.safetensors``) and ``med_config.json`` (both from ``THUDM/ImageReward``), and the
            ``bert-base-uncased`` tokenizer files (``vocab.txt``, ``tokenizer_config.json``) unless
            ``tokenizer_path`` is given.
        tokenizer_path: folder of the ``bert-base-uncased`` tokenizer.
        device, dtype, frame_batch_size: as for :class:`~euphonium.rewards.clip.ClipScore`.

    The ViT's size (width, depth, patch, image size) is read from the checkpoint's shapes with
    BLIP's 64-dimensional heads and LayerNorm eps 1e-6 (ViT-L/16 at 224 for the official file).
    """

    name = "image_reward"

    def __init__(
        self,
        path: Union[str, Path],
        *,
        tokenizer_path: Optional[Union[str, Path]] = None,
        weights: str = IMAGE_REWARD_WEIGHTS,
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype = torch.float32,
        frame_batch_size: int = 64,
    ):
        from transformers import AutoTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        path = local_dir("path", path, f"{IMAGE_REWARD_WEIGHTS}, med_config.json and a BERT tokenizer")
        med = read_json("path", local_file("path", path / "med_config.json", "ImageReward's med_config.json"))
        weights_path = path / weights
        state = strip_prefix(load_weights("weights", weights_path), "module.")
        self.frame_batch_size = check_positive_int("frame_batch_size", frame_batch_size)
        tok_arg = "tokenizer_path" if tokenizer_path is not None else "path"
        tok_dir = local_dir(tok_arg, tokenizer_path, "a BERT tokenizer") if tokenizer_path is not None else path
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"{tok_arg}: no bert-base-uncased tokenizer in {str(tok_dir)!r} ({err})") from None
        # BLIP's init_tokenizer: [DEC] as bos and [ENC] added (ids 30522, 30523; the prompt never uses them).
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})

        vit = "blip.visual_encoder."
        if f"{vit}cls_token" not in state or f"{vit}patch_embed.proj.weight" not in state:
            raise ValueError(f"weights: {str(weights_path)!r} is not an ImageReward state dict (no {vit}cls_token)")
        width = state[f"{vit}cls_token"].shape[-1]
        patch = state[f"{vit}patch_embed.proj.weight"].shape[-1]
        depth = len({k.split(".")[3] for k in state if k.startswith(f"{vit}blocks.")})
        grid = math.isqrt(state[f"{vit}pos_embed"].shape[1] - 1)
        vision_config = BlipVisionConfig(
            hidden_size=width,
            intermediate_size=state[f"{vit}blocks.0.mlp.fc1.weight"].shape[0],
            num_hidden_layers=depth,
            num_attention_heads=width // 64,
            image_size=grid * patch,
            patch_size=patch,
            hidden_act="gelu",
            layer_norm_eps=1e-6,
        )
        text_config = BlipTextConfig(
            vocab_size=int(med["vocab_size"]),
            hidden_size=int(med["hidden_size"]),
            encoder_hidden_size=width,
            intermediate_size=int(med["intermediate_size"]),
            num_hidden_layers=int(med["num_hidden_layers"]),
            num_attention_heads=int(med["num_attention_heads"]),
            max_position_embeddings=int(med["max_position_embeddings"]),
            hidden_act=med.get("hidden_act", "gelu"),
            layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)),
            pad_token_id=int(med.get("pad_token_id", 0)),
            is_decoder=True,  # builds the cross-attention layers; the forward runs as an encoder
        )
        with skip_init():
            self.vision = BlipVisionModel(vision_config)
            self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = AestheticMLP(text_config.hidden_size)  # ImageReward's MLP is the aesthetic predictor's

        try:
            vision_state = blip_vit_to_transformers(state, vit, depth)
        except KeyError as err:
            raise ValueError(f"weights: {str(weights_path)!r} lacks {err.args[0]!r}") from None
        text_state = {k[len("blip.text_encoder.") :]: v for k, v in state.items() if k.startswith("blip.text_encoder.")}
        mlp_state = {k[len("mlp.") :]: v for k, v in state.items() if k.startswith("mlp.")}
        for module, sub in ((self.vision, vision_state), (self.text, text_state), (self.mlp, mlp_state)):
            expected = {k: v.shape for k, v in module.state_dict().items() if not k.endswith("position_ids")}
            check_keys("weights", weights_path, sub, expected)
            module.load_state_dict({k: sub[k] for k in expected}, strict=False)
        self.device = resolve_device(device)
        self.dtype = dtype
        for module in (self.vision, self.text):
            module.to(self.device, dtype).eval().requires_grad_(False)
        self.mlp.to(self.device).eval().requires_grad_(False)
        self.image_size = vision_config.image_size

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` in [0, 1] -> BLIP pixel values: shorter side to 224 (bicubic), centre crop, normalise."""
        frames = center_crop(resize_shortest(frames.float(), self.image_size), (self.image_size, self.image_size))
        return normalize(frames, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def compute(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        b, f = videos.shape[:2]
        frames = rgb_frames(videos, "ImageReward").to(self.device)
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=MAX_PROMPT_TOKENS, return_tensors="pt"
        ).to(self.device)
        # Every frame of clip b is scored with prompt b: repeat each prompt F times.
        ids = tokens["input_ids"].repeat_interleave(f, dim=0)
        mask = tokens["attention_mask"].repeat_interleave(f, dim=0)
        scores = []
        for start in range(0, b * f, self.frame_batch_size):
            end = min(start + self.frame_batch_size, b * f)
            image = self.vision(pixel_values=self.preprocess(frames[start:end]).to(self.dtype)).last_hidden_state
            image_mask = torch.ones(image.shape[:2], dtype=torch.long, device=self.device)
            text = self.text(
                input_ids=ids[start:end],
                attention_mask=mask[start:end],
                encoder_hidden_states=image,
                encoder_attention_mask=image_mask,
                is_decoder=False,
            ).last_hidden_state[:, 0]
            scores.append(self.mlp(text.float())[:, 0])
        reward = (torch.cat(scores) - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD
        return reward.view(b, f).mean(dim=1).to(videos.device)


register_reward(ImageReward.name, ImageReward)
