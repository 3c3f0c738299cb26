"""Run outputs: ``metrics.jsonl`` + TensorBoard events (+ a Weights & Biases run), the reward curve, and
sample grids.

``loggers`` (the config's) chooses the sinks: ``jsonl`` (always: resume and the reward curve read it),
``tensorboard`` (``DIR/tensorboard``) and ``wandb`` (``pip install 'euphonium[wandb]'``; the run is kept
in ``DIR/wandb`` and continued by a resumed run; ``WANDB_MODE=offline`` needs no account). Each gets
the resolved config, every metric row, the evaluation clips (``DIR/eval_clips/step-N.mp4`` where
imageio's ffmpeg encoder is installed, else ``.gif``; TensorBoard shows them as frame grids) and the
reward-curve image.

The JSON-lines logs are strict JSON: a non-finite value is written as ``null`` (its key listed under
``non_finite`` in that row, and a warning). A row is appended whole or not at all (a failed write
cuts the file back); a line torn by a kill is skipped by the readers, with a warning, and dropped by
the resume-time rewrite, which goes through a temporary file and a rename.
"""

from __future__ import annotations

import json
import math
import os
import uuid
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import imageio.v2 as imageio
import numpy as np
import torch

from euphonium import checkpointing as cp


def strict_row(row: Dict[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
    """``row`` with every non-finite float replaced by None (strict JSON), and those keys."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return row, bad
    return {**{k: (None if k in bad else v) for k, v in row.items()}, "non_finite": bad}, bad


def read_rows(path: Path) -> List[Dict[str, Any]]:
    """The rows of a JSON-lines log; a line that does not parse (torn by a kill or a full disk) is
    skipped with a warning naming the file and the line."""
    rows = []
    lines = Path(path).read_text(errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            where = "its last line" if number == len(lines) else f"line {number}"
            warnings.warn(f"{path}: skipping {where}, which is not a JSON object (torn by a kill?)", stacklevel=2)
            continue
        rows.append(row)
    return rows


LOGGERS = ("jsonl", "tensorboard", "wandb")


class MetricsLogger:
    """Appends one JSON object per step to ``DIR/<name>.jsonl`` (``metrics``, ``eval``) and mirrors
    scalars to TensorBoard and wandb (as ``<name>/<key>`` for every name but ``metrics``).

    ``loggers``: the sinks besides ``jsonl`` (``tensorboard``, ``wandb``); ``wandb``: keyword arguments
    of ``wandb.init`` (``project``, ``entity``, ``name``, ``tags``...). The wandb run's id is kept in
    ``DIR/wandb/euphonium-run-id``, so a resumed run continues it; its x axis is the ``step`` metric,
    so the rows a resume redoes replace nothing and are not dropped.
    """

    def __init__(
        self,
        output_dir: Path,
        enabled: bool = True,
        loggers: Sequence[str] = ("jsonl", "tensorboard"),
        wandb: Optional[Dict[str, Any]] = None,
    ):
        unknown = sorted(set(loggers) - set(LOGGERS))
        if unknown:
            raise ValueError(f"unknown loggers {unknown}; known: {list(LOGGERS)}")
        self.enabled = enabled
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / "metrics.jsonl"
        self.writer = None
        self.run = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if "tensorboard" in loggers:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.output_dir / "tensorboard"))
            if "wandb" in loggers:
                self.run = _wandb_run(self.output_dir, dict(wandb or {}))

    def log(self, metrics: Dict[str, float], name: str = "metrics") -> None:
        if not self.enabled:
            return
        row, bad = strict_row(metrics)
        if bad:
            warnings.warn(
                f"{name}.jsonl step {metrics.get('step')}: non-finite {', '.join(f'{k}={metrics[k]}' for k in bad)} "
                "written as null",
                stacklevel=2,
            )
        cp.append_line(self.path.with_name(f"{name}.jsonl"), json.dumps(row, allow_nan=False))
        prefix = "" if name == "metrics" else f"{name}/"
        scalars = {
            prefix + k: v for k, v in metrics.items() if k != "step" and isinstance(v, (int, float)) and v is not None
        }
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, metrics["step"])
            self.writer.flush()
        if self.run is not None:
            self.run.log({"step": metrics["step"], **scalars})

    def log_config(self, config: Dict[str, Any]) -> None:
        """The resolved config: a TensorBoard text (JSON) and the wandb run's config."""
        if not self.enabled:
            return
        if self.writer is not None:
            text = json.dumps(config, indent=1, default=str)
            self.writer.add_text("config", "```\n" + text + "\n```", 0)
            self.writer.flush()
        if self.run is not None:
            self.run.config.update(config, allow_val_change=True)

    def log_clips(self, step: int, videos: torch.Tensor, prompts: Sequence[str], name: str = "eval") -> Optional[Path]:
        """Clips ``[B, F, C, H, W]`` in [0, 1] (or uint8) side by side as ``DIR/<name>_clips/step-N.mp4``
        (``.gif`` without a video encoder), to wandb as a video and to TensorBoard as a frame grid."""
        if not self.enabled or videos is None or len(videos) == 0:
            return None
        frames = clip_frames(videos)
        path = write_clip(frames, self.output_dir / f"{name}_clips" / f"step-{step}")
        caption = " | ".join(prompts)
        if self.writer is not None:
            self.writer.add_image(f"{name}/clips", frame_grid(videos), step, dataformats="HWC")
            self.writer.add_text(f"{name}/clip_prompts", caption, step)
            self.writer.flush()
        if self.run is not None:
            import wandb

            self.run.log({"step": step, f"{name}/clips": wandb.Video(str(path), caption=caption)})
        return path

    def log_image(self, name: str, path: Path, step: int) -> None:
        """An image file (the reward curve) to TensorBoard and wandb."""
        if not self.enabled or not Path(path).is_file():
            return
        if self.writer is not None:
            self.writer.add_image(name, imageio.imread(path)[..., :3], step, dataformats="HWC")
            self.writer.flush()
        if self.run is not None:
            import wandb

            self.run.log({"step": step, name: wandb.Image(str(path))})

    def truncate(self, name: str, after: int) -> None:
        """Drop the rows of ``DIR/<name>.jsonl`` whose step is greater than ``after`` (and any torn
        line), rewriting the file atomically: a kill leaves the old file or the new one."""
        path = self.path.with_name(f"{name}.jsonl")
        if self.enabled and path.exists():
            rows = [r for r in read_rows(path) if isinstance(r.get("step"), int) and r["step"] <= after]
            cp.atomic_write(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.run is not None:
            self.run.finish()
            self.run = None


WANDB_ID_FILE = "euphonium-run-id"


def _wandb_run(output_dir: Path, kwargs: Dict[str, Any]):
    """A wandb run kept in ``output_dir/wandb`` (its id saved there: a resumed run continues it)."""
    try:
        import wandb
    except ImportError:
        raise ValueError("loggers lists wandb, which is not installed: pip install 'euphonium[wandb]'") from None
    folder = output_dir / "wandb"
    folder.mkdir(parents=True, exist_ok=True)
    id_file = folder / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else ""
    if not run_id:
        run_id = uuid.uuid4().hex[:12]
        cp.atomic_write(id_file, run_id + "\n")
    kwargs.setdefault("project", "euphonium")
    kwargs.setdefault("name", output_dir.resolve().name)
    run = wandb.init(dir=str(output_dir), id=run_id, resume="allow", **kwargs)
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


def _uint8(videos: torch.Tensor) -> torch.Tensor:
    if videos.dtype == torch.uint8:
        return videos.cpu()
    return (videos.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def clip_frames(videos: torch.Tensor, pad: int = 2) -> List[np.ndarray]:
    """Frames ``[H, W', 3]`` uint8 of clips ``[B, F, C, H, W]`` placed side by side (white gaps)."""
    v = _uint8(videos)
    b, f, c, h, w = v.shape
    if c == 1:
        v = v.expand(b, f, 3, h, w)
    frames = []
    for t in range(f):
        canvas = torch.full((3, h, b * (w + pad) - pad), 255, dtype=torch.uint8)
        for i in range(b):
            canvas[:, :, i * (w + pad) : i * (w + pad) + w] = v[i, t, :3]
        frames.append(canvas.permute(1, 2, 0).numpy())
    return frames


def frame_grid(videos: torch.Tensor, pad: int = 2) -> np.ndarray:
    """``[H', W', 3]`` uint8: one row per clip, its frames left to right."""
    v = _uint8(videos)
    b, f, c, h, w = v.shape
    if c == 1:
        v = v.expand(b, f, 3, h, w)
    grid = torch.full((3, b * (h + pad) - pad, f * (w + pad) - pad), 255, dtype=torch.uint8)
    for i in range(b):
        for t in range(f):
            grid[:, i * (h + pad) : i * (h + pad) + h, t * (w + pad) : t * (w + pad) + w] = v[i, t, :3]
    return grid.permute(1, 2, 0).numpy()


def video_encoder_available() -> bool:
    """imageio can write MP4 (the ``imageio-ffmpeg`` package and its ffmpeg binary are installed)."""
    try:
        import imageio_ffmpeg

        return bool(imageio_ffmpeg.get_ffmpeg_exe())
    except Exception:  # not installed, or no binary for this platform
        return False


def write_clip(frames: Sequence[np.ndarray], path: Path, fps: int = 8) -> Path:
    """``frames`` as ``path.mp4`` (H.264, padded to multiples of 16) where a video encoder is installed,
    else ``path.gif``; written to a temporary name and renamed. Returns the file written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if video_encoder_available():
        out = path.with_suffix(".mp4")
        h, w = frames[0].shape[:2]
        ph, pw = -h % 16, -w % 16
        padded = [np.pad(f, ((0, ph), (0, pw), (0, 0)), constant_values=255) for f in frames]
        tmp = out.with_name(f"{cp.TMP_PREFIX}{out.stem}-{os.getpid()}.mp4")
        imageio.mimsave(tmp, padded, fps=fps, codec="libx264", macro_block_size=16)
    else:
        out = path.with_suffix(".gif")
        tmp = out.with_name(f"{cp.TMP_PREFIX}{out.stem}-{os.getpid()}.gif")
        imageio.mimsave(tmp, list(frames), duration=1000 / fps, loop=0)
    os.replace(tmp, out)
    return out


def read_metrics(path: Path) -> List[Dict[str, float]]:
    """The rows of ``metrics.jsonl`` or ``eval.jsonl`` (see :func:`read_rows`)."""
    return read_rows(path)


def _number(value) -> float:
    return float("nan") if value is None else float(value)


def plot_reward_curve(metrics_path: Path, out: Path) -> Path:
    """The training batches' ``reward_mean`` per step (and a 5-step moving average) as a PNG; next to it,
    on its own scale, the fixed evaluation set's ``reward_mean`` from ``eval.jsonl`` when there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    steps = [r["step"] for r in rows]
    reward = np.array([_number(r.get("reward_mean")) for r in rows])
    eval_path = Path(metrics_path).with_name("eval.jsonl")
    evals = read_metrics(eval_path) if eval_path.exists() else []
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 3.5), squeeze=False)
    ax = axes[0, 0]
    ax.plot(steps, reward, alpha=0.4, label="reward_mean")
    if len(reward) >= 5:
        smooth = np.convolve(reward, np.ones(5) / 5, mode="valid")
        ax.plot(steps[4:], smooth, label="5-step average")
    ax.set_title("training batches (new prompts every step)", fontsize=10)
    ax.set_ylabel("mean outcome reward")
    ax.legend()
    if evals:
        ax = axes[0, 1]
        ax.plot([r["step"] for r in evals], [_number(r.get("reward_mean")) for r in evals], "o-", color="black")
        ax.set_title("fixed evaluation set (ODE, same noise each time)", fontsize=10)
    for ax in axes[0]:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def save_video_grid(videos: torch.Tensor, prompts: Sequence[str], path: Path, scale: int = 4, fps: int = 4) -> Path:
    """Videos ``[B, F, C, H, W]`` in [0, 1] side by side: ``path.gif`` (animated) and ``path.png``
    (one row per video, frames left to right); the prompts go to ``path.txt``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    v = (videos.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    v = v.repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)  # nearest-neighbour upscale
    b, f, c, h, w = v.shape
    pad = 2
    frames = []
    for t in range(f):
        canvas = torch.full((c, h, b * (w + pad) - pad), 255, dtype=torch.uint8)
        for i in range(b):
            canvas[:, :, i * (w + pad) : i * (w + pad) + w] = v[i, t]
        frames.append(canvas.permute(1, 2, 0).numpy())
    imageio.mimsave(path.with_suffix(".gif"), frames, duration=1000 / fps, loop=0)
    rows = torch.full((c, b * (h + pad) - pad, f * (w + pad) - pad), 255, dtype=torch.uint8)
    for i in range(b):
        for t in range(f):
            rows[:, i * (h + pad) : i * (h + pad) + h, t * (w + pad) : t * (w + pad) + w] = v[i, t]
    imageio.imwrite(path.with_suffix(".png"), rows.permute(1, 2, 0).numpy())
    path.with_suffix(".txt").write_text("\n".join(prompts) + "\n")
    return path.with_suffix(".gif")
