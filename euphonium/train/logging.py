"""Run outputs: ``metrics.jsonl`` + TensorBoard events, the reward curve, and sample grids.

The JSON-lines logs are strict JSON: a non-finite value is written as ``null`` (its key listed under
``non_finite`` in that row, and a warning). A row is appended whole or not at all (a failed write
cuts the file back); a line torn by a kill is skipped by the readers, with a warning, and dropped by
the resume-time rewrite, which goes through a temporary file and a rename.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

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


class MetricsLogger:
    """Appends one JSON object per step to ``DIR/<name>.jsonl`` (``metrics``, ``eval``) and mirrors
    scalars to TensorBoard (as ``<name>/<key>`` for every name but ``metrics``)."""

    def __init__(self, output_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))

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
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(prefix + key, value, metrics["step"])
        self.writer.flush()

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
