"""Report on a toy base model: forward timing, reward statistics per prompt attribute, sample pictures,
and what RL would see of it (:func:`group_statistics`).

Samples every prompt of :func:`~euphonium.toy.world.all_prompts` ``repeats`` times with the
deterministic Euler ODE (:func:`~euphonium.toy.model.sample_ode`), scores the clips with
:func:`euphonium.toy.rewards.toy_rewards` and :func:`~euphonium.toy.rewards.attribute_accuracy`, and
writes ``report.json``, ``samples.png`` (renderer vs model, frame by frame) and ``samples.gif``.
Then samples groups of clips per prompt the way the main job (``python -m euphonium.train``) does and
reports the within-group spread of the reward against the spread between prompts, and per attribute
how often the model draws the prompted value (its preference) against how often it draws a clear
value at all and which values it draws (its capability).
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

from euphonium.models.diffusers import Conditioning, DiffusersFlowModel
from euphonium.sampler import preset, rollout
from euphonium.toy import world
from euphonium.toy.model import count_parameters, load_toy_model, predict_velocity, sample_ode
from euphonium.toy.rewards import DEFAULT_WEIGHTS, attribute_accuracy, classify, toy_rewards

# The main job's reward (euphonium/configs/toy.yaml: `rewards.toy.weights`): smoothness logged, not trained.
MAIN_JOB_WEIGHTS: Dict[str, float] = {"color": 1.0, "shape": 1.0, "size": 1.0, "direction": 1.0, "smoothness": 0.0}
MAIN_JOB_ALGORITHM = "euphonium_fast"  # the main job's default algorithm (its sampler preset)
_VALUES = {"color": list(world.COLORS), "shape": list(world.SHAPES), "size": list(world.SIZES)}
_VALUES["direction"] = list(world.DIRECTIONS)
CLEAR_THRESHOLD = 0.5  # a clip shows a clear value of an attribute when that value's term scores >= this

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


def attribute_capability(videos: torch.Tensor, prompts: Sequence[str]) -> Dict[str, Dict[str, object]]:
    """Per attribute: the prompted value's rate (preference) against what the model can draw (capability).

    For each attribute ``k`` of :data:`euphonium.toy.world.ATTRIBUTES`:

    - ``preference``: the fraction of clips whose read-out (:func:`~euphonium.toy.rewards.classify`)
      is the prompted value (:func:`~euphonium.toy.rewards.attribute_accuracy`);
      ``preference_by_value``: the same among the prompts that name each value.
    - ``clear``: the fraction of clips that show *some* value of ``k`` clearly: the clip's term ``k``
      scored against the prompt with ``k`` set to its best value (the other words as prompted) is at
      least :data:`CLEAR_THRESHOLD`. A model that draws the wrong value cleanly scores high here.
    - ``drawn``: the read-out histogram (fraction of clips read as each value; direction ``None``:
      no clear motion): every value the model can draw appears here.
    """
    prompts = list(prompts)
    attrs = [world.parse_prompt(p) for p in prompts]
    accuracy = attribute_accuracy(videos, prompts)
    readout = classify(videos)
    out: Dict[str, Dict[str, object]] = {}
    for key in world.ATTRIBUTES:
        best = None
        for value in _VALUES[key]:
            swapped = [world.format_prompt(**{**a, key: value}) for a in attrs]
            term = toy_rewards(videos, swapped)[key]
            best = term if best is None else torch.maximum(best, term)
        by_value = {}
        for value in _VALUES[key]:
            idx = [i for i, a in enumerate(attrs) if a[key] == value]
            if idx:
                by_value[value] = float(accuracy[key][idx].mean())
        drawn = {str(v): readout[key].count(v) / len(prompts) for v in [*_VALUES[key], None]}
        if key != "direction":
            drawn.pop("None")
        out[key] = {
            "preference": float(accuracy[key].mean()),
            "preference_by_value": by_value,
            "clear": float((best >= CLEAR_THRESHOLD).float().mean()),
            "drawn": drawn,
        }
    return out


@torch.no_grad()
def group_statistics(
    transformer,
    text_encoder,
    prompts: Optional[Sequence[str]] = None,
    *,
    group_size: int = 4,
    algorithm: str = MAIN_JOB_ALGORITHM,
    weights: Optional[Dict[str, float]] = None,
    seed: int = 0,
    batch: int = 64,
) -> Dict[str, object]:
    """What GRPO sees of the model: one group of ``group_size`` rollouts per prompt, sampled as the main job
    samples, against the spread between prompts; and the fixed-noise ODE clips its evaluation scores.

    Rollouts: :func:`euphonium.sampler.preset` ``(algorithm)`` (default ``euphonium_fast``: 10 steps,
    shift 3, a random 3-step ``cps`` window in the first half, one initial noise per group) with
    guidance off (the preset's ``c = 0.01 delta`` moves a step by ~6e-4 noise stds, DESIGN.md section 5,
    and leaves the base model's statistics to the model), decoded from ``traj.x0`` as the trainer
    does; rewards :func:`~euphonium.toy.rewards.toy_rewards` with ``weights`` (default
    :data:`MAIN_JOB_WEIGHTS`, the main job's). ``prompts``: one group each (default
    :func:`~euphonium.toy.world.all_prompts`).

    Returns ``reward`` (mean combined reward), ``within_group_std`` (mean over groups of the unbiased
    std of the group's ``group_size`` rewards, what the group advantages divide by), ``between_prompt_std``
    (std over prompts of the group means), ``terms`` (mean of each term), ``flip_rate`` per attribute
    (fraction of groups in which the prompted value is drawn by some clips and not by others), the
    rollouts' :func:`attribute_capability`, and ``ode``: the mean rewards and preferences of one ODE clip
    per prompt from fixed noise with the same schedule (what the main job's evaluation measures).
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an integer >= 2, got {group_size!r}")
    prompts = list(prompts) if prompts is not None else world.all_prompts()
    weights = dict(weights) if weights is not None else dict(MAIN_JOB_WEIGHTS)
    config = preset(algorithm, guidance=False)
    velocity = DiffusersFlowModel(transformer)
    param = next(transformer.parameters())
    shape = (world.CHANNELS, world.NUM_FRAMES, world.HEIGHT, world.WIDTH)
    gen = torch.Generator().manual_seed(seed)
    per_batch = max(1, batch // group_size)
    videos = []
    for start in range(0, len(prompts), per_batch):
        chunk = [p for p in prompts[start : start + per_batch] for _ in range(group_size)]
        cond = Conditioning(prompt_embeds=text_encoder.encode(chunk).to(param.dtype))
        traj = rollout(
            velocity, cond, config, shape=(len(chunk), *shape), group_size=group_size, seed=gen, dtype=param.dtype
        )
        videos.append(world.latents_to_video(traj.x0.float()))
    video = torch.cat(videos)
    grouped = [p for p in prompts for _ in range(group_size)]
    rewards = toy_rewards(video, grouped, weights)
    combined = rewards["combined"].view(len(prompts), group_size)
    accuracy = attribute_accuracy(video, grouped)
    flips = {k: accuracy[k].view(len(prompts), group_size) for k in world.ATTRIBUTES}

    ode_config = config.replace(schedule="ode", same_initial_noise=False, sde_window_size=None, sde_window_range=None)
    ode_videos = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        cond = Conditioning(prompt_embeds=text_encoder.encode(chunk).to(param.dtype))
        traj = rollout(velocity, cond, ode_config, shape=(len(chunk), *shape), seed=gen, dtype=param.dtype)
        ode_videos.append(world.latents_to_video(traj.x0.float()))
    ode_video = torch.cat(ode_videos)
    ode_rewards = toy_rewards(ode_video, prompts, weights)
    ode_accuracy = attribute_accuracy(ode_video, prompts)
    return {
        "sampler": f"preset({algorithm!r}, guidance=False): {config.num_steps} steps, shift {config.shift}, "
        f"{config.schedule} noise_level {config.noise_level}, window {config.sde_window_size} in "
        f"{config.sde_window_range}, same_initial_noise={config.same_initial_noise}",
        "weights": weights,
        "prompts": len(prompts),
        "group_size": group_size,
        "seed": seed,
        "reward": float(combined.mean()),
        "within_group_std": float(combined.std(dim=1).mean()),
        "between_prompt_std": float(combined.mean(dim=1).std()) if len(prompts) > 1 else 0.0,
        "terms": {k: float(v.mean()) for k, v in rewards.items() if k != "combined"},
        "flip_rate": {k: float((f.amax(dim=1) != f.amin(dim=1)).float().mean()) for k, f in flips.items()},
        "attributes": attribute_capability(video, grouped),
        "ode": {
            "reward": float(ode_rewards["combined"].mean()),
            "terms": {k: float(v.mean()) for k, v in ode_rewards.items() if k != "combined"},
            "preference": {k: float(v.mean()) for k, v in ode_accuracy.items()},
        },
    }


def format_group_statistics(stats: Dict[str, object]) -> str:
    """Plain-text summary of :func:`group_statistics`."""
    lines = [
        f"groups ({stats['prompts']} prompts x {stats['group_size']}, {stats['sampler']}):",
        f"  reward {stats['reward']:.3f}, within-group std {stats['within_group_std']:.3f}, "
        f"between-prompt std {stats['between_prompt_std']:.3f}; ODE (evaluation) reward {stats['ode']['reward']:.3f}",
        f"  {'attribute':<10} {'pref':>5} {'ODE':>5} {'clear':>5} {'flips':>5}  drawn",
    ]
    for key, row in stats["attributes"].items():
        drawn = " ".join(f"{v} {r:.2f}" for v, r in row["drawn"].items())
        lines.append(
            f"  {key:<10} {row['preference']:5.2f} {stats['ode']['preference'][key]:5.2f} {row['clear']:5.2f} "
            f"{stats['flip_rate'][key]:5.2f}  {drawn}"
        )
    return "\n".join(lines)


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
    groups: bool = True,
) -> Dict[str, object]:
    """Sample, score and draw the toy model at ``model`` (``None``: the committed weights); write to ``out``.

    ``groups``: add :func:`group_statistics` (every prompt, groups of 4, the main job's sampler) as ``"groups"``.

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
    if groups:
        start = time.perf_counter()
        report["groups"] = group_statistics(transformer, text_encoder, seed=seed)
        report["groups"]["seconds"] = time.perf_counter() - start
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
    if "groups" in report:
        lines += ["", format_group_statistics(report["groups"])]
    return "\n".join(lines)
