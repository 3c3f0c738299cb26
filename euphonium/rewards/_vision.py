"""Shared pieces of the model-based rewards: local-folder checks, safe weight loading, frame preprocessing.

Every model reward loads from a local folder and never executes code from a checkpoint: weights come
from safetensors or from ``torch.load(weights_only=True)``. Frames are preprocessed in PyTorch the way
each model's official pipeline does it (resize with bicubic interpolation, centre crop or letterbox,
normalise), so a score is differentiable in the pixels and runs on the model's device.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

PathLike = Union[str, Path]

# CLIP's pixel statistics (OpenAI), used by CLIP, BLIP, HPS, ImageReward and Qwen2-VL.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def local_dir(arg: str, path, what: str) -> Path:
    """``path`` as an existing local folder, or a one-line ``ValueError`` naming ``arg`` and ``what`` it should hold."""
    if not isinstance(path, (str, Path)) or not str(path):
        raise TypeError(f"{arg} must be a local folder path, got {path!r}")
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ValueError(f"{arg} must be a local folder holding {what}, got {str(path)!r} (not a folder)")
    return path


def local_file(arg: str, path: Path, what: str) -> Path:
    if not path.is_file():
        raise ValueError(f"{arg}: {str(path)!r} is missing ({what})")
    return path


def read_json(arg: str, path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{arg}: cannot read {str(path)!r} as JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{arg}: {str(path)!r} must hold a JSON object")
    return value


def load_weights(arg: str, path: Path) -> Dict[str, torch.Tensor]:
    """A flat ``name -> tensor`` state dict from ``.safetensors`` or a PyTorch pickle read with ``weights_only=True``.

    A pickle that wraps the weights in ``{"state_dict": ...}`` (open_clip / Lightning checkpoints) is
    unwrapped. Anything that is not a mapping of tensors is a ``ValueError`` naming the file.
    """
    if not path.is_file():
        raise ValueError(f"{arg}: weights file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader error becomes one line naming the file
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{arg}: cannot load weights from {str(path)!r}: {message}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{arg}: {str(path)!r} does not hold a state dict (a mapping of names to tensors)")
    return state


def strip_prefix(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """Remove ``prefix`` (e.g. DDP's ``module.``) from every key when all keys carry it."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def check_keys(arg: str, path: Path, state: Dict[str, torch.Tensor], expected: Dict[str, torch.Size]) -> None:
    """Every expected key is present with its shape; a one-line error names the file and the first problems."""
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(
            f"{arg}: {str(path)!r} is not in the expected layout: {len(missing)} missing keys, e.g. {missing[:3]}"
        )
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(s)}" for k, s in expected.items() if state[k].shape != s]
    if wrong:
        raise ValueError(f"{arg}: {str(path)!r} has tensors of the wrong shape, e.g. {wrong[:3]}")


def load_into(arg: str, path: Path, module: torch.nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Load ``state`` into ``module``: every parameter and persistent buffer must be present with its shape."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    check_keys(arg, path, state, expected)
    module.load_state_dict({k: state[k] for k in expected}, strict=True)


def resize_shortest(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``[N, C, H, W]`` so the shorter side is ``size`` (bicubic, antialiased when shrinking), as
    ``torchvision.transforms.Resize(size)`` and ``CLIPImageProcessor`` do (the long side truncated)."""
    h, w = frames.shape[-2:]
    if h <= w:
        out = (size, int(size * w / h))
    else:
        out = (int(size * h / w), size)
    if out == (h, w):
        return frames
    shrink = out[0] < h or out[1] < w
    return F.interpolate(frames, size=out, mode="bicubic", align_corners=False, antialias=shrink)


def center_crop(frames: torch.Tensor, crop: Tuple[int, int]) -> torch.Tensor:
    h, w = frames.shape[-2:]
    if h < crop[0] or w < crop[1]:
        # The frames are already resized so that the crop fits; pad a too-small side with zeros as torchvision does.
        pad_h, pad_w = max(crop[0] - h, 0), max(crop[1] - w, 0)
        frames = F.pad(frames, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        h, w = frames.shape[-2:]
    top, left = (h - crop[0]) // 2, (w - crop[1]) // 2
    return frames[..., top : top + crop[0], left : left + crop[1]]


def letterbox(frames: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """Resize the longer side to ``size`` (bicubic) and pad the shorter one with ``fill`` to a centred square.

    HPS v2's evaluation transform (open_clip's ``ResizeMaxSize``), applied before normalisation.
    """
    h, w = frames.shape[-2:]
    scale = size / max(h, w)
    if scale != 1.0:
        new = (round(h * scale), round(w * scale))
        frames = F.interpolate(frames, size=new, mode="bicubic", align_corners=False, antialias=scale < 1)
    h, w = frames.shape[-2:]
    pad_h, pad_w = size - h, size - w
    if pad_h or pad_w:
        frames = F.pad(frames, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)
    return frames


def normalize(frames: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=frames.dtype, device=frames.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=frames.dtype, device=frames.device).view(1, -1, 1, 1)
    return (frames - mean_t) / std_t


def rgb_frames(videos: torch.Tensor, what: str) -> torch.Tensor:
    """``[B, F, 3, H, W]`` -> ``[B * F, 3, H, W]`` float32 (an error for another channel count)."""
    if videos.shape[2] != 3:
        raise ValueError(f"videos must be RGB ([B, F, 3, H, W]) for {what}, got shape {tuple(videos.shape)}")
    return videos.reshape(-1, *videos.shape[2:]).float()


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def skip_init():
    """A context in which transformers models skip their random initialisation (every weight is loaded next)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def resolve_device(device) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def features(out) -> torch.Tensor:
    """transformers < 5 returns the projected embedding; >= 5 a model output whose ``pooler_output`` holds it."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def edge(value, key: str) -> int:
    return int(value[key]) if isinstance(value, dict) else int(value)


class ClipTower:
    """A local ``transformers.CLIPModel`` with its tokenizer and image-processor settings, as differentiable
    unit-norm image and text embeddings (the part PickScore and the aesthetic predictor share).

    ``model_path``: a ``save_pretrained`` folder (``config.json`` and weights). ``processor_path``: the
    folder holding ``preprocessor_config.json`` and, when ``text=True``, the tokenizer (default:
    ``model_path``). Frames are resized on the shorter side (bicubic), centre-cropped and normalised
    with the folder's mean and std.
    """

    def __init__(
        self,
        arg: str,
        model_path: PathLike,
        processor_path: Optional[PathLike] = None,
        *,
        device=None,
        dtype: torch.dtype = torch.float32,
        text: bool = True,
        frame_batch_size: int = 64,
    ):
        from transformers import AutoTokenizer, CLIPModel

        model_path = local_dir(arg, model_path, "a CLIPModel saved with save_pretrained (config.json and weights)")
        local_file(arg, model_path / "config.json", "a CLIPModel's config.json")
        proc_arg = "processor_path" if processor_path is not None else arg
        processor_path = (
            model_path if processor_path is None else local_dir(proc_arg, processor_path, "a CLIP processor")
        )
        pre = read_json(
            proc_arg,
            local_file(proc_arg, processor_path / "preprocessor_config.json", "the CLIPImageProcessor's settings"),
        )
        self.frame_batch_size = check_positive_int("frame_batch_size", frame_batch_size)
        self.device = resolve_device(device)
        self.dtype = dtype
        self.model = CLIPModel.from_pretrained(model_path, local_files_only=True).to(self.device, dtype).eval()
        self.model.requires_grad_(False)
        self.resize_to = edge(pre.get("size", 224), "shortest_edge")
        crop = pre.get("crop_size", self.resize_to)
        self.crop = (edge(crop, "height"), edge(crop, "width"))
        self.do_center_crop = bool(pre.get("do_center_crop", True))
        self.mean = tuple(pre.get("image_mean", OPENAI_CLIP_MEAN))
        self.std = tuple(pre.get("image_std", OPENAI_CLIP_STD))
        self.tokenizer = None
        if text:
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(processor_path, local_files_only=True)
            except (OSError, ValueError) as err:
                raise ValueError(f"{proc_arg}: no CLIP tokenizer in {str(processor_path)!r} ({err})") from None
            self.max_length = min(
                int(self.tokenizer.model_max_length), int(self.model.config.text_config.max_position_embeddings)
            )

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` in [0, 1] -> CLIP pixel values ``[N, 3, crop_h, crop_w]``."""
        frames = resize_shortest(frames.float(), self.resize_to)
        if self.do_center_crop:
            frames = center_crop(frames, self.crop)
        return normalize(frames, self.mean, self.std)

    def image_embeddings(self, frames: torch.Tensor, unit: bool = True) -> torch.Tensor:
        """``[N, 3, H, W]`` in [0, 1] -> ``[N, D]`` float32 projected embeddings (unit norm when ``unit``)."""
        frames = frames.to(self.device)
        out = torch.cat(
            [
                features(self.model.get_image_features(pixel_values=self.preprocess(chunk).to(self.dtype))).float()
                for chunk in frames.split(self.frame_batch_size)
            ]
        )
        return F.normalize(out, dim=-1) if unit else out

    def text_embeddings(self, prompts: Iterable[str]) -> torch.Tensor:
        """Unit-norm projected text embeddings ``[B, D]`` float32."""
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        out = features(
            self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask"))
        )
        return F.normalize(out.float(), dim=-1)
