"""Report on a toy base model: forward timing, reward statistics per prompt attribute, sample pictures.

Samples every prompt of :func:`~euphonium.toy.world.all_prompts` ``repeats`` times with the
deterministic Euler ODE (:func:`~euphonium.toy.model.sample_ode`), scores the clips with
:func:`euphonium.toy.rewards.toy_rewards` and :func:`~euphonium.toy.rewards.attribute_accuracy`, and
writes ``report.json``, ``samples.png`` (renderer vs model, frame by frame) and ``samples.gif``.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import imageio.v2 as imageio
import numpy as np
import torch

from euphonium.toy import world
from euphonium.toy.model import count_parameters, load_toy_model, predict_velocity, sample_ode
from euphonium.toy.rewards import DEFAULT_WEIGHTS, attribute_accuracy, toy_rewards

GRID_PROMPTS = (
    "a small red square moving left",
    "a large green circle moving right",
    "a small blue diamond moving up",
    "a large yellow square moving down",
    "a large red diamond moving right",
    "a small green square moving down",
    "a large blue circle moving left",
    "a small yellow circle moving up",
)


def forward_timing(transformer, text_encoder, batch: int = 16, repeats: int = 20) -> Dict[str, float]:
    """Median and min wall time (ms) of one no-grad transformer forward on ``batch`` clips."""
    param = next(transformer.parameters())
    prompts = world.sample_prompts(batch, 0)
    x = torch.randn(batch, world.CHANNELS, world.NUM_FRAMES, world.HEIGHT, world.WIDTH).to(param)
    sigma = torch.rand(batch).to(param.device)
    times: List[float] = []
    with torch.no_grad():
        context = text_encoder.encode(prompts).to(param.dtype)
        for i in range(repeats + 3):
            start = time.perf_counter()
            predict_velocity(transformer, x, sigma, context)
            if i >= 3:  # the first calls allocate and warm caches
                times.append((time.perf_counter() - start) * 1000)
    return {
        "batch": batch,
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "threads": torch.get_num_threads(),
    }


def attribute_table(
    rewards: Dict[str, torch.Tensor], accuracy: Dict[str, torch.Tensor], prompts: Sequence[str]
) -> Dict[str, Dict[str, Dict[str, float]]]:
    """``{attribute: {value: {"n", "reward/<term>", "accuracy/<attribute>", "accuracy/all"}}}`` means."""
    attrs = [world.parse_prompt(p) for p in prompts]
    table: Dict[str, Dict[str, Dict[str, float]]] = {}
    for key in world.ATTRIBUTES:
        table[key] = {}
        for value in sorted({a[key] for a in attrs}):
            idx = torch.tensor([i for i, a in enumerate(attrs) if a[key] == value])
            row = {"n": int(idx.numel())}
            row.update({f"reward/{k}": float(v[idx].mean()) for k, v in rewards.items()})
            row.update({f"accuracy/{k}": float(v[idx].mean()) for k, v in accuracy.items()})
            table[key][value] = row
    return table


def _upscale(video: torch.Tensor, scale: int) -> np.ndarray:
    """``[F, 3, H, W]`` in [0, 1] -> uint8 ``[F, H*scale, W*scale, 3]`` (nearest neighbour)."""
    frames = (video.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    return frames.repeat_interleave(scale, 1).repeat_interleave(scale, 2).numpy()


def save_grid_png(real: torch.Tensor, fake: torch.Tensor, prompts: Sequence[str], path: Path) -> None:
    """PNG: one row per prompt, the renderer's clip then the model's, frame by frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, frames = len(prompts), real.shape[1]
    fig, axes = plt.subplots(
        rows,
        2 * frames + 1,
        figsize=(2 * frames * 0.55 + 0.5, rows * 0.72),
        gridspec_kw={"width_ratios": [1] * frames + [0.3] + [1] * frames},
    )
    for r in range(rows):
        for c in range(2 * frames + 1):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            if c == frames:
                ax.axis("off")
                continue
            clip, f = (real, c) if c < frames else (fake, c - frames - 1)
            ax.imshow(clip[r, f].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        axes[r, 0].set_ylabel(
            prompts[r].replace(" moving", "\nmoving"), rotation=0, ha="right", va="center", fontsize=6
        )
    axes[0, frames // 2].set_title("renderer", fontsize=8)
    axes[0, frames + 1 + frames // 2].set_title("base model (ODE)", fontsize=8)
    fig.subplots_adjust(left=0.16, right=0.99, top=0.93, bottom=0.01, wspace=0.05, hspace=0.08)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def save_grid_gif(real: torch.Tensor, fake: torch.Tensor, path: Path, scale: int = 6, fps: int = 4) -> None:
    """Animated GIF: renderer clips in the top row, model clips below, one column per prompt."""
    pad = 2
    tiles_real = [_upscale(v, scale) for v in real]
    tiles_fake = [_upscale(v, scale) for v in fake]
    frames, h, w, _ = tiles_real[0].shape
    cols = len(tiles_real)
    canvas = np.full((frames, 2 * h + 3 * pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for c in range(cols):
        x = pad + c * (w + pad)
        canvas[:, pad : pad + h, x : x + w] = tiles_real[c]
        canvas[:, 2 * pad + h : 2 * pad + 2 * h, x : x + w] = tiles_fake[c]
    imageio.mimsave(path, list(canvas), duration=1000 / fps, loop=0)


def run_report(
    model: Optional[Path] = None,
    out: Path = Path("docs/toy"),
    repeats: int = 4,
    steps: int = 20,
    shift: float = 3.0,
    seed: int = 0,
    threads: Optional[int] = 2,
) -> Dict[str, object]:
    """Sample, score and draw the toy model at ``model`` (``None``: the committed weights); write to ``out``.

    Returns the report dictionary that is also written to ``out/report.json``.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    transformer, text_encoder = load_toy_model(model)
    timing = forward_timing(transformer, text_encoder)

    prompts = world.all_prompts() * repeats
    start = time.perf_counter()
    video = world.latents_to_video(sample_ode(transformer, text_encoder, prompts, steps, shift, seed))
    sample_seconds = time.perf_counter() - start
    rewards = toy_rewards(video, prompts)
    accuracy = attribute_accuracy(video, prompts)
    reference = world.render(prompts, seed)
    ref_rewards = toy_rewards(reference, prompts)

    report = {
        "model": str(model) if model is not None else "euphonium/assets/toy (committed)",
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "parameters": {"transformer": count_parameters(transformer), "text_encoder": count_parameters(text_encoder)},
        "forward_timing": timing,
        "sampling": {"steps": steps, "shift": shift, "seed": seed, "clips": len(prompts), "seconds": sample_seconds},
        "weights": DEFAULT_WEIGHTS,
        "rewards": {k: {"mean": float(v.mean()), "std": float(v.std())} for k, v in rewards.items()},
        "accuracy": {k: float(v.mean()) for k, v in accuracy.items()},
        "renderer_rewards": {k: float(v.mean()) for k, v in ref_rewards.items()},
        "per_attribute": attribute_table(rewards, accuracy, prompts),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))

    index = [prompts.index(p) for p in GRID_PROMPTS]
    save_grid_png(reference[index], video[index], GRID_PROMPTS, out / "samples.png")
    save_grid_gif(reference[index], video[index], out / "samples.gif")
    return report


def format_report(report: Dict[str, object]) -> str:
    """Plain-text summary of :func:`run_report`'s dictionary."""
    terms = list(report["rewards"])
    lines = [
        f"model: {report['model']}  ({report['parameters']['transformer']} + "
        f"{report['parameters']['text_encoder']} parameters)",
        f"forward, batch {report['forward_timing']['batch']}: {report['forward_timing']['median_ms']:.1f} ms median "
        f"({report['forward_timing']['threads']} threads)",
        f"sampling: {report['sampling']['clips']} clips, {report['sampling']['steps']} Euler steps, "
        f"shift {report['sampling']['shift']}: {report['sampling']['seconds']:.1f} s",
        "rewards (mean +- std): "
        + ", ".join(f"{k} {v['mean']:.3f}+-{v['std']:.3f}" for k, v in report["rewards"].items()),
        "renderer's own clips:  " + ", ".join(f"{k} {v:.3f}" for k, v in report["renderer_rewards"].items()),
        "attribute accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in report["accuracy"].items()),
        "",
        f"{'attribute':<10} {'value':<8} {'n':>4} " + " ".join(f"{t[:6]:>6}" for t in terms) + "   acc  all",
    ]
    for key, rows in report["per_attribute"].items():
        for value, row in rows.items():
            lines.append(
                f"{key:<10} {value:<8} {row['n']:>4} "
                + " ".join(f"{row['reward/' + t]:6.3f}" for t in terms)
                + f" {row['accuracy/' + key]:5.2f} {row['accuracy/all']:4.2f}"
            )
    return "\n".join(lines)
