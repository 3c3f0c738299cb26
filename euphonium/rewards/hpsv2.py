"""HPS v2 / v2.1 (Human Preference Score, Wu et al., 2023): an open_clip ViT-H-14 fine-tuned on HPD v2.

The official checkpoints (``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt`` from ``xswu/HPSv2``)
are open_clip state dicts (``{"state_dict": {...}}``) of the ``ViT-H-14`` architecture. open_clip is
not used here: it needs torchvision, whose only wheels on this project's index are CUDA builds that
do not load with the CPU torch (and break ``transformers``' imports once installed). The same
network is built from ``transformers.CLIPModel`` and the open_clip keys are mapped onto it (fused
``in_proj`` split into q/k/v, ``proj`` matrices transposed); the forward pass is the same
computation (pre-LN blocks, GELU, class-token pooling with ``ln_post``, EOT pooling with ``ln_final``).

Score as in the official ``hpsv2.score``: the cosine of the unit-norm image and text features (no
logit scale), about 0.2-0.3 for real images; per frame and averaged over a clip's frames. Frames are
preprocessed as HPS's evaluation transform does: the longer side resized to 224 (bicubic), padded
with black to a centred square, normalised with CLIP's mean and std.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence, Union

import torch
import torch.nn.functional as F

from euphonium.rewards._vision import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    check_positive_int,
    features,
    letterbox,
    load_weights,
    local_dir,
    local_file,
    normalize,
    read_json,
    resolve_device,
    rgb_frames,
    skip_init,
    strip_prefix,
)
from euphonium.rewards.base import Reward, register_reward

HPS_CHECKPOINTS = ("HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt")

# open_clip's model_configs/ViT-H-14.json
VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}


def clip_config_from_open_clip(model_cfg: dict, eos_token_id: int, bos_token_id: int, pad_token_id: int):
    """A ``transformers.CLIPConfig`` for an open_clip ``model_cfg`` (plain ViT vision and text towers)."""
    from transformers import CLIPConfig

    vision, text = dict(model_cfg["vision_cfg"]), dict(model_cfg["text_cfg"])
    unsupported = [
        k
        for k in ("hf_model_name", "timm_model_name", "attentional_pool", "ls_init_value", "input_patchnorm")
        if vision.get(k) or text.get(k)
    ]
    if unsupported or vision.get("global_average_pool") or text.get("pool_type", "argmax") not in ("argmax", "eot"):
        raise ValueError(f"open_clip model_cfg uses options this loader does not map: {unsupported or 'pooling'}")
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    v_width = int(vision["width"])
    t_width = int(text.get("width", 512))
    return CLIPConfig(
        text_config=dict(
            vocab_size=int(text.get("vocab_size", 49408)),
            hidden_size=t_width,
            intermediate_size=int(t_width * float(text.get("mlp_ratio", 4.0))),
            num_hidden_layers=int(text.get("layers", 12)),
            num_attention_heads=int(text.get("heads", 8)),
            max_position_embeddings=int(text.get("context_length", 77)),
            hidden_act=act,
            layer_norm_eps=1e-5,
            eos_token_id=eos_token_id,
            bos_token_id=bos_token_id,
            pad_token_id=pad_token_id,
        ),
        vision_config=dict(
            hidden_size=v_width,
            intermediate_size=int(v_width * float(vision.get("mlp_ratio", 4.0))),
            num_hidden_layers=int(vision["layers"]),
            num_attention_heads=v_width // int(vision.get("head_width", 64)),
            image_size=int(vision["image_size"]),
            patch_size=int(vision["patch_size"]),
            hidden_act=act,
            layer_norm_eps=1e-5,
        ),
        projection_dim=int(model_cfg["embed_dim"]),
    )


def _blocks(state: Dict[str, torch.Tensor], src: str, dst: str, layers: int) -> Dict[str, torch.Tensor]:
    out = {}
    for i in range(layers):
        s, d = f"{src}.{i}", f"{dst}.{i}"
        q, k, v = state[f"{s}.attn.in_proj_weight"].chunk(3, dim=0)
        qb, kb, vb = state[f"{s}.attn.in_proj_bias"].chunk(3, dim=0)
        out.update(
            {
                f"{d}.self_attn.q_proj.weight": q,
                f"{d}.self_attn.k_proj.weight": k,
                f"{d}.self_attn.v_proj.weight": v,
                f"{d}.self_attn.q_proj.bias": qb,
                f"{d}.self_attn.k_proj.bias": kb,
                f"{d}.self_attn.v_proj.bias": vb,
            }
        )
        for a, b in (
            ("attn.out_proj", "self_attn.out_proj"),
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ):
            out[f"{d}.{b}.weight"] = state[f"{s}.{a}.weight"]
            out[f"{d}.{b}.bias"] = state[f"{s}.{a}.bias"]
    return out


def _depth(state: Dict[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)})


def open_clip_to_transformers(state: Dict[str, torch.Tensor], vision_layers: int, text_layers: int):
    """Map an open_clip ``CLIP`` state dict (ViT towers, built-in text transformer) to ``CLIPModel``'s keys."""
    out = {
        "logit_scale": state["logit_scale"],
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].t(),
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].t(),
    }
    out.update(_blocks(state, "transformer.resblocks", "text_model.encoder.layers", text_layers))
    out.update(_blocks(state, "visual.transformer.resblocks", "vision_model.encoder.layers", vision_layers))
    return {k: v.contiguous() for k, v in out.items()}


class HPSv2(Reward):
    """``r[b] = mean_f cos(E_img(frame_{b,f}), E_txt(prompt_b))`` with an HPS v2 / v2.1 checkpoint.

    Args:
        path: folder with the official checkpoint (``HPS_v2.1_compressed.pt`` or ``HPS_v2_compressed.pt``;
            ``checkpoint=`` names another file: a ``.pt`` read with ``weights_only=True`` or a
            ``.safetensors`` with the same open_clip keys) and a CLIP BPE tokenizer (``tokenizer.json`` or
            ``vocab.json`` + ``merges.txt``, e.g. from ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``). An
            ``open_clip_config.json`` (open_clip's ``{"model_cfg": ...}``) overrides the ViT-H-14
            architecture.
        checkpoint: the checkpoint's file name in ``path`` (default: the first of ``HPS_CHECKPOINTS`` found).
        device, dtype, frame_batch_size: as for :class:`~euphonium.rewards.clip.ClipScore`.
    """

    name = "hpsv2"

    def __init__(
        self,
        path: Union[str, Path],
        *,
        checkpoint: Union[str, None] = None,
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype = torch.float32,
        frame_batch_size: int = 64,
    ):
        from transformers import AutoTokenizer, CLIPModel

        path = local_dir("path", path, f"an HPS v2 checkpoint ({' or '.join(HPS_CHECKPOINTS)}) and a CLIP tokenizer")
        if checkpoint is None:
            found = [name for name in HPS_CHECKPOINTS if (path / name).is_file()]
            if not found:
                raise ValueError(f"path: {str(path)!r} holds none of {list(HPS_CHECKPOINTS)} (or pass checkpoint=)")
            checkpoint = found[0]
        ckpt_path = local_file("checkpoint", path / checkpoint, "the HPS v2 checkpoint")
        model_cfg = VIT_H_14
        if (path / "open_clip_config.json").is_file():
            model_cfg = read_json("path", path / "open_clip_config.json").get("model_cfg")
            if not isinstance(model_cfg, dict) or "vision_cfg" not in model_cfg or "text_cfg" not in model_cfg:
                raise ValueError(f"path: {str(path / 'open_clip_config.json')!r} has no model_cfg with vision/text")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"path: no CLIP tokenizer in {str(path)!r} ({err})") from None
        self.frame_batch_size = check_positive_int("frame_batch_size", frame_batch_size)
        tok = self.tokenizer
        config = clip_config_from_open_clip(
            model_cfg,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
        )
        state = strip_prefix(load_weights("checkpoint", ckpt_path), "module.")
        depths = (
            _depth(state, "visual.transformer.resblocks."),
            _depth(state, "transformer.resblocks."),
        )
        if depths != (config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers):
            raise ValueError(
                f"checkpoint: {str(ckpt_path)!r} does not match the architecture {self._arch(model_cfg)} "
                f"(vision/text blocks {depths}); put the right open_clip_config.json in the folder"
            )
        try:
            mapped = open_clip_to_transformers(
                state, config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers
            )
        except KeyError as err:
            raise ValueError(
                f"checkpoint: {str(ckpt_path)!r} is not an open_clip ViT state dict (no key {err.args[0]!r})"
            ) from None
        self.device = resolve_device(device)
        self.dtype = dtype
        with skip_init():
            self.model = CLIPModel(config)
        expected = self.model.state_dict()
        wrong = [k for k, v in expected.items() if k in mapped and mapped[k].shape != v.shape]
        if wrong or set(mapped) - set(expected):
            bad = wrong[:2] or sorted(set(mapped) - set(expected))[:2]
            raise ValueError(
                f"checkpoint: {str(ckpt_path)!r} does not match the architecture {self._arch(model_cfg)} "
                f"(e.g. {bad}); put the right open_clip_config.json in the folder"
            )
        self.model.load_state_dict(mapped, strict=False)  # position_ids buffers are the model's own
        missing = [k for k in expected if k not in mapped and not k.endswith("position_ids")]
        if missing:
            raise ValueError(f"checkpoint: {str(ckpt_path)!r} lacks {missing[:3]}")
        self.model.to(self.device, dtype).eval().requires_grad_(False)
        self.image_size = config.vision_config.image_size
        self.max_length = config.text_config.max_position_embeddings

    @staticmethod
    def _arch(model_cfg: dict) -> str:
        return "ViT-H-14" if model_cfg is VIT_H_14 else "of open_clip_config.json"

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` in [0, 1] -> ``[N, 3, S, S]``: longer side to S, black padding, CLIP normalisation."""
        return normalize(letterbox(frames.float(), self.image_size), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        out = features(
            self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask"))
        )
        return F.normalize(out.float(), dim=-1)

    def compute(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        b, f = videos.shape[:2]
        frames = rgb_frames(videos, "HPS v2").to(self.device)
        image = torch.cat(
            [
                features(self.model.get_image_features(pixel_values=self.preprocess(chunk).to(self.dtype))).float()
                for chunk in frames.split(self.frame_batch_size)
            ]
        )
        image = F.normalize(image, dim=-1).view(b, f, -1)
        text = self.text_embeddings(prompts)
        return (image * text[:, None, :]).sum(-1).mean(dim=1).to(videos.device)


register_reward(HPSv2.name, HPSv2)
