"""VideoAlign / VideoReward (Liu et al., 2025): a Qwen2-VL-2B reward model with three heads.

The model reads the whole clip and a long evaluation prompt holding three special tokens,
``<|VQ_reward|>`` (visual quality), ``<|MQ_reward|>`` (motion quality) and ``<|TA_reward|>`` (text
alignment); a bias-free linear head on the last hidden state at each token gives that score. The
official release (``KwaiVGI/VideoReward``) is a folder with ``model_config.json`` (data, model, LoRA
and inference settings, including each head's mean and std), the tokenizer with the three tokens
added (151660 entries) and ``checkpoint-*/model.pth``: the full state dict of the PEFT-wrapped model
(``base_model.model.*``, LoRA r=64, alpha=128 on the language model's linear layers, the old
transformers layout ``visual.*`` / ``model.*``). It is loaded here with ``weights_only=True``, the
LoRA deltas merged into the weights (``W + alpha / r * B @ A``), the keys mapped to transformers'
current ``Qwen2VLForConditionalGeneration`` layout, and the architecture built from the base
Qwen2-VL-2B-Instruct ``config.json``.

The video is prepared as VideoAlign's ``vision_process.fetch_video`` does, in PyTorch (so the score
is differentiable in the pixels and no torchvision is needed, which transformers' Qwen2-VL video
processor requires): frames sampled uniformly at the config's ``fps`` (2) from the clip's
``video_fps``, resized (bicubic, antialiased) to ``smart_resize`` with the config's
``max_frame_pixels``, normalised with CLIP's mean and std, and cut into Qwen2-VL's
``temporal x 14 x 14`` patches in the merge order of its processor.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from euphonium.rewards._vision import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    load_weights,
    local_dir,
    local_file,
    read_json,
    resolve_device,
    skip_init,
)
from euphonium.rewards.base import Reward, check_reward_values, check_videos, register_reward

SPECIAL_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
HEADS = ("vq", "mq", "ta")
FRAME_FACTOR = 2
MIN_FRAMES = 4
MAX_FRAMES = 768

# VideoAlign's prompt template "detailed_special" (prompt_template.py, MIT licence): the model was
# trained with exactly this text, so it is the model's input contract.
DETAILED_PROMPT_WITH_SPECIAL_TOKEN = """
You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, Motion Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three categories, with 0 being the worst and 10 being the best. Each evaluation should be independent of the others.

**Visual Quality:**  
Evaluate the overall visual quality of the video, with a focus on static factors. The following sub-dimensions should be considered:
- **Reasonableness:** The video should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

Please provide the ratings of Visual Quality: <|VQ_reward|>
END

**Motion Quality:**  
Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following sub-dimensions:
- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, or missing body parts).
- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing should flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, mouth movements).
- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different motions or camera angles should be seamless, and the overall dynamic feel should be visually pleasing.
- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend naturally with the background, without obvious artifacts or the feeling of cut-and-paste effects.
- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas where the video might have blurry or unsteady sections that hinder visual continuity.
- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion quality.

Please provide the ratings of Motion Quality: <|MQ_reward|>
END

**Text Alignment:**  
Assess how well the video matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions like talking or blinking) align with the described prompt. The motion should match the prompt in terms of type, scale, and direction.
- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes checking if real-world locations or scenes are accurately represented, though some stylistic adaptation is acceptable.  
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the video adheres to this style.
- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) are consistent with the expected behavior from the prompt.

Textual prompt - {text_prompt}
Please provide the ratings of Text Alignment: <|TA_reward|>
END
"""  # noqa: E501, W291 - long lines and trailing spaces are part of the trained prompt


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> Tuple[int, int]:
    """Qwen2-VL's frame size: both sides multiples of ``factor``, area within [min, max], aspect kept."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = math.floor(height / beta / factor) * factor
        w = math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def sample_frames(total: int, video_fps: float, fps: Optional[float], nframes: Optional[int]) -> List[int]:
    """VideoAlign's uniform sampling: an even number of frames at ``fps`` (or ``nframes``), ends included."""
    if total < FRAME_FACTOR:
        raise ValueError(f"VideoAlign needs at least {FRAME_FACTOR} frames per clip, got {total}")
    if nframes is not None:
        n = round(nframes / FRAME_FACTOR) * FRAME_FACTOR
    else:
        low = math.ceil(MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
        high = math.floor(min(MAX_FRAMES, total) / FRAME_FACTOR) * FRAME_FACTOR
        n = round(min(max(total / video_fps * fps, low), high) / FRAME_FACTOR) * FRAME_FACTOR
    n = min(max(n, FRAME_FACTOR), total)
    return torch.linspace(0, total - 1, n).round().long().tolist()


def patchify(frames: torch.Tensor, patch: int, merge: int, temporal: int) -> Tuple[torch.Tensor, List[int]]:
    """``[T, C, H, W]`` normalised frames -> Qwen2-VL's ``[t * h * w, C * temporal * patch * patch]`` and ``[t, h, w]``.

    The last frame is repeated up to a multiple of ``temporal``; patches are ordered by frame group,
    then by ``merge x merge`` block, as the processor does.
    """
    if frames.shape[0] % temporal:
        frames = torch.cat([frames, frames[-1:].expand(temporal - frames.shape[0] % temporal, -1, -1, -1)])
    t, c, height, width = frames.shape
    gt, gh, gw = t // temporal, height // patch, width // patch
    x = frames.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal * patch * patch), [gt, gh, gw]


def merge_lora(state: Dict[str, torch.Tensor], scale: float) -> Dict[str, torch.Tensor]:
    """Fold PEFT LoRA layers into plain weights.

    ``x.base_layer.weight``, ``x.lora_A.<adapter>.weight`` and ``x.lora_B.<adapter>.weight`` become
    ``x.weight = base + scale * B @ A`` (in float32, cast back to the base dtype).
    """
    out: Dict[str, torch.Tensor] = {}
    lora: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        parts = key.split(".")
        if "lora_A" in parts or "lora_B" in parts:
            i = parts.index("lora_A") if "lora_A" in parts else parts.index("lora_B")
            lora.setdefault(".".join(parts[:i]), {})[parts[i]] = value
        elif ".base_layer." in key:
            out[key.replace(".base_layer.", ".")] = value
        else:
            out[key] = value
    for name, ab in lora.items():
        if set(ab) != {"lora_A", "lora_B"} or f"{name}.weight" not in out:
            raise KeyError(f"{name}.lora_A/lora_B/base_layer")
        base = out[f"{name}.weight"]
        delta = ab["lora_B"].float() @ ab["lora_A"].float()
        out[f"{name}.weight"] = (base.float() + scale * delta).to(base.dtype)
    return out


def to_current_layout(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """PEFT-wrapped, pre-4.52 Qwen2-VL keys -> ``Qwen2VLForConditionalGeneration``'s current keys."""
    out = {}
    for key, value in state.items():
        if key.startswith("base_model.model."):
            key = key[len("base_model.model.") :]
        if key.startswith("visual."):
            key = "model." + key
        elif key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
            key = "model.language_model." + key[len("model.") :]
        out[key] = value
    return out


class VideoAlign(Reward):
    """VideoAlign's three heads (and their sum) as named reward parts.

    Args:
        path: the VideoReward folder: ``model_config.json``, the tokenizer (in ``path``, ``path/tokenizer``
            or ``checkpoint-*/tokenizer``) and ``checkpoint-*/model.pth`` (the newest step; or
            ``checkpoint=`` a file inside ``path``, ``.pth`` or ``.safetensors``).
        base_path: a local copy of ``Qwen/Qwen2-VL-2B-Instruct`` (its ``config.json`` is what is read;
            default: the config's ``model_name_or_path`` when that is a local folder).
        heads: the parts returned, from ``vq``, ``mq``, ``ta``, ``overall`` (their sum). A sequence gives a
            mapping ``{"videoalign_vq": [B], ...}`` (named parts in a :class:`RewardSet`); one string gives
            that head as ``[B]``.
        normalize: standardise each head with the checkpoint's ``inference_config`` mean and std, as the
            official inference does (``use_norm=True``).
        video_fps: the frame rate of the clips (VideoAlign samples them at the config's ``fps``).
        device, dtype: where and in which dtype the model runs (default CPU, float32).
        batch_size: clips per forward pass.
    """

    name = "videoalign"

    def __init__(
        self,
        path: Union[str, Path],
        *,
        base_path: Optional[Union[str, Path]] = None,
        checkpoint: Optional[str] = None,
        heads: Union[str, Sequence[str]] = HEADS,
        normalize: bool = True,
        video_fps: float = 16.0,
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 1,
    ):
        from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration

        self.single = isinstance(heads, str)
        self.heads = (heads,) if self.single else tuple(heads)
        if not self.heads or any(h not in HEADS + ("overall",) for h in self.heads):
            raise ValueError(f"heads must name some of {list(HEADS) + ['overall']}, got {heads!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(video_fps, (int, float)) or not 0 < video_fps < math.inf:
            raise ValueError(f"video_fps must be a positive number, got {video_fps!r}")
        path = local_dir("path", path, "VideoReward's model_config.json, tokenizer and checkpoint-*/model.pth")
        cfg = read_json("path", local_file("path", path / "model_config.json", "VideoReward's model_config.json"))
        data, model_cfg = cfg.get("data_config") or {}, cfg.get("model_config") or {}
        peft, self.inference = cfg.get("peft_lora_config") or {}, cfg.get("inference_config")
        if model_cfg.get("reward_token") != "special" or not model_cfg.get("use_special_tokens"):
            raise ValueError(f"path: {str(path)!r} is not a special-token VideoAlign model (model_config.reward_token)")
        self.output_dim = int(model_cfg.get("output_dim", 1))
        self.fps = float(data.get("fps") or 2.0)
        self.nframes = data.get("num_frames")
        self.max_pixels = int(data.get("max_frame_pixels") or 240 * 320)
        if data.get("prompt_template_type", "detailed_special") != "detailed_special":
            raise ValueError(f"path: prompt_template_type {data.get('prompt_template_type')!r} is not supported")

        if base_path is None:
            guess = model_cfg.get("model_name_or_path")
            if not guess or not Path(guess).is_dir():
                raise ValueError(
                    f"base_path: pass a local copy of the base model (model_config names {guess!r}, not a local folder)"
                )
            base_path = guess
        base_path = local_dir("base_path", base_path, "the base Qwen2-VL model's config.json")
        config = Qwen2VLConfig.from_pretrained(local_file("base_path", base_path / "config.json", "config.json").parent)
        self.tokenizer = self._tokenizer(path, AutoTokenizer)
        ids = self.tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
        if any(i is None or i == self.tokenizer.unk_token_id for i in ids):
            raise ValueError(f"path: the tokenizer lacks VideoAlign's tokens {list(SPECIAL_TOKENS)}")
        self.special_ids = ids
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"path: the tokenizer in {str(path)!r} has no chat template")
        self.video_token = "<|video_pad|>"
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

        ckpt = self._checkpoint(path, checkpoint)
        scale = float(peft.get("lora_alpha", 128)) / (
            math.sqrt(float(peft.get("lora_r", 64))) if peft.get("use_rslora") else float(peft.get("lora_r", 64))
        )
        try:
            state = to_current_layout(merge_lora(load_weights("checkpoint", ckpt), scale))
        except KeyError as err:
            raise ValueError(f"checkpoint: {str(ckpt)!r} has an incomplete LoRA layer {err.args[0]!r}") from None
        head = state.pop("rm_head.weight", None)
        if head is None or head.shape != (self.output_dim, config.text_config.hidden_size):
            raise ValueError(
                f"checkpoint: {str(ckpt)!r} has no rm_head.weight of shape "
                f"({self.output_dim}, {config.text_config.hidden_size}); not a VideoAlign checkpoint for this base"
            )
        config.text_config.vocab_size = len(self.tokenizer)
        with skip_init():
            model = Qwen2VLForConditionalGeneration(config)
        expected = model.state_dict()
        tied = bool(getattr(config, "tie_word_embeddings", False) or config.text_config.tie_word_embeddings)
        missing = [k for k in expected if k not in state and not (tied and k == "lm_head.weight")]
        unexpected = [k for k in state if k not in expected]
        wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(
                f"checkpoint: {str(ckpt)!r} does not fit the base model of {str(base_path)!r}: "
                f"missing {missing[:2]}, unexpected {unexpected[:2]}, wrong shape {wrong[:2]}"
            )
        model.load_state_dict(state, strict=False)
        if tied:
            model.tie_weights()
        self.device = resolve_device(device)
        self.dtype = dtype
        self.model = model.to(self.device, dtype).eval().requires_grad_(False)
        self._wants_token_types = "mm_token_type_ids" in inspect.signature(self.model.model.forward).parameters
        self.head = nn.Linear(config.text_config.hidden_size, self.output_dim, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(head)
        self.head.to(self.device, dtype).eval().requires_grad_(False)
        vision = config.vision_config
        self.patch, self.merge, self.temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        self.factor = self.patch * self.merge
        self.min_pixels = 128 * self.factor**2  # VIDEO_MIN_PIXELS = 128 * 28 * 28
        pre = (
            read_json("base_path", base_path / "preprocessor_config.json")
            if (base_path / "preprocessor_config.json").is_file()
            else {}
        )
        self.mean = tuple(pre.get("image_mean", OPENAI_CLIP_MEAN))
        self.std = tuple(pre.get("image_std", OPENAI_CLIP_STD))
        self.normalize = bool(normalize) and self.inference is not None
        self.video_fps = float(video_fps)
        self.batch_size = batch_size

    @staticmethod
    def _tokenizer(path: Path, auto):
        for folder in [path, path / "tokenizer", *sorted(path.glob("checkpoint-*/tokenizer"))]:
            if (folder / "tokenizer_config.json").is_file():
                return auto.from_pretrained(folder, local_files_only=True, padding_side="right")
        raise ValueError(
            f"path: no tokenizer (tokenizer_config.json) in {str(path)!r}, its tokenizer/ or checkpoint-*/"
        )

    @staticmethod
    def _checkpoint(path: Path, checkpoint: Optional[str]) -> Path:
        if checkpoint is not None:
            return local_file("checkpoint", path / checkpoint, "the VideoAlign checkpoint")
        steps = sorted(
            (int(p.name.split("-")[-1]), p) for p in path.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
        )
        for _, folder in reversed(steps):
            for name in ("model.pth", "model.safetensors"):
                if (folder / name).is_file():
                    return folder / name
        raise ValueError(
            f"path: no checkpoint-*/model.pth in {str(path)!r} (a LoRA-only checkpoint is not supported; "
            "pass checkpoint= for a full state dict elsewhere in the folder)"
        )

    def prompt(self, text: str, video_tokens: int) -> str:
        """The chat text for one clip: the video placeholder expanded to ``video_tokens`` and the evaluation prompt."""
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "video"},
                    {"type": "text", "text": DETAILED_PROMPT_WITH_SPECIAL_TOKEN.format(text_prompt=text)},
                ],
            }
        ]
        chat = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if chat.count(self.video_token) != 1:
            raise ValueError(f"the tokenizer's chat template must place one {self.video_token} for a video")
        return chat.replace(self.video_token, self.video_token * video_tokens)

    def preprocess(self, clip: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        """One clip ``[F, 3, H, W]`` in [0, 1] -> (``pixel_values_videos``, ``[t, h, w]``)."""
        idx = sample_frames(clip.shape[0], self.video_fps, self.fps, self.nframes)
        frames = clip[idx].float()
        h, w = smart_resize(frames.shape[-2], frames.shape[-1], self.factor, self.min_pixels, self.max_pixels)
        if (h, w) != tuple(frames.shape[-2:]):
            shrink = h < frames.shape[-2] or w < frames.shape[-1]
            frames = F.interpolate(frames, size=(h, w), mode="bicubic", align_corners=False, antialias=shrink)
        mean = torch.tensor(self.mean, device=frames.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=frames.device).view(1, 3, 1, 1)
        return patchify((frames - mean) / std, self.patch, self.merge, self.temporal)

    def scores(self, videos: torch.Tensor, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """``{"vq", "mq", "ta", "overall"}`` -> ``[B]`` float32 on the model's device."""
        if videos.shape[2] != 3:
            raise ValueError(f"videos must be RGB ([B, F, 3, H, W]) for VideoAlign, got shape {tuple(videos.shape)}")
        rows = []
        for start in range(0, videos.shape[0], self.batch_size):
            pixels, grids, texts = [], [], []
            for clip, text in zip(videos[start : start + self.batch_size], prompts[start : start + self.batch_size]):
                values, grid = self.preprocess(clip.to(self.device))
                pixels.append(values)
                grids.append(grid)
                texts.append(self.prompt(text, math.prod(grid) // self.merge**2))
            tokens = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False).to(self.device)
            ids = tokens["input_ids"]
            extra = {}
            if self._wants_token_types:  # transformers >= 5.x computes M-RoPE from per-token modality ids
                extra["mm_token_type_ids"] = (ids == self.model.config.video_token_id).long() * 2
            hidden = self.model.model(
                input_ids=ids,
                attention_mask=tokens["attention_mask"],
                pixel_values_videos=torch.cat(pixels).to(self.dtype),
                video_grid_thw=torch.tensor(grids, device=self.device),
                use_cache=False,
                **extra,
            ).last_hidden_state
            per_head = []
            for k, token in enumerate(self.special_ids):
                where = ids == token
                if not bool((where.sum(dim=1) == 1).all()):
                    raise ValueError(f"each VideoAlign prompt must hold {SPECIAL_TOKENS[k]} exactly once")
                logits = self.head(hidden[where]).float()  # [b, output_dim], in batch order
                per_head.append(logits[:, k] if self.output_dim == 3 else logits[:, 0])
            rows.append(torch.stack(per_head, dim=1))
        values = torch.cat(rows)  # [B, 3]
        out = {}
        for k, name in enumerate(HEADS):
            value = values[:, k]
            if self.normalize:
                key = name.upper()
                value = (value - float(self.inference[f"{key}_mean"])) / float(self.inference[f"{key}_std"])
            out[name] = value
        out["overall"] = out["vq"] + out["mq"] + out["ta"]
        return out

    def part_names(self) -> List[str]:
        return [f"{self.name}_{h}" for h in self.heads]

    def compute(self, videos: torch.Tensor, prompts: Sequence[str]):
        scores = self.scores(videos, prompts)
        if self.single:
            return scores[self.heads[0]].to(videos.device)
        return {f"{self.name}_{h}": scores[h].to(videos.device) for h in self.heads}

    def __call__(self, videos: torch.Tensor, prompts: Sequence[str]):
        if self.single:
            return super().__call__(videos, prompts)
        batch = check_videos(videos, prompts)
        parts: Mapping[str, torch.Tensor] = self.compute(videos, prompts)
        return {k: check_reward_values(k, v, batch, prompts, videos.device) for k, v in parts.items()}


register_reward(VideoAlign.name, VideoAlign)
