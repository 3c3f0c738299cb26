"""Where one Euphonium GRPO training step spends its time: model forward/backward, euphonium ops, PRM
gradient, rewards, optimizer.

One step, as DESIGN.md section 3 lays it out: a guided rollout (``euphonium.sampler.rollout`` with the
``euphonium`` sampler preset: the policy's velocity at every step, the PRM gradient at the guided
steps, ``ops.sde_step``), decoding and outcome rewards, ``ops.dual_reward_advantages``, then for each
trained step a forward of the policy with gradients, ``Trajectory.recompute_log_prob``
(``ops.sde_log_prob``), ``ops.dual_reward_loss`` and the backward, and one AdamW step.

Models:

- ``--model toy`` (default): the toy task's ``WanTransformer3DModel`` (``euphonium.toy``,
  randomly initialised: weights do not change the time), its prompt encoder, a ``LatentRewardModel``
  PRM and the exact toy pixel rewards.
- ``--model wan``: a randomly initialised model of Wan2.1-T2V-1.3B's shape (30 layers, 12 heads x 128,
  FFN 8960; bf16, gradient checkpointing in training) on 480p/81-frame latents ``[B, 16, 21, 60, 104]``,
  cached random T5-sized prompt embeddings ``[B, 512, 4096]``, a ``LatentRewardModel`` PRM on the
  latents, decoding by a randomly initialised ``AutoencoderKLWan`` (Wan2.1's VAE shape) and DDPO's
  JPEG-incompressibility reward. Meant for a GPU; ``--wan-tiny`` shrinks it to check the path on a CPU.

Attribution: the policy is wrapped (forward time); ``ops.sde_step`` and ``ops.reward_grad`` are
wrapped for the duration of the step (the sampler calls them through ``euphonium.ops``); the other
calls are timed where this script makes them; a hook on the velocity splits ``loss.backward()`` into
the ops' backward (up to ``d loss / d v``) and the model's backward. On CUDA every boundary
synchronises, which costs a little overlap. ``other`` is what no bucket covers (Python, trajectory
bookkeeping, the prompt encoder). Results: the mean per timed step (after one untimed warm-up step) in
``benchmarks/results/<device>/train_step_<model>.{json,csv,png}``.

The step is assembled from the library's public pieces listed above, the ones the trainer
(``euphonium.train``) drives, so that each call can be timed where it is made.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<script>.py` from anywhere

import torch  # noqa: E402

from benchmarks.common import RESULTS_DIR, ROOT, describe_device, synchronize  # noqa: E402
from euphonium import ops  # noqa: E402
from euphonium.rewards.prm import LatentRewardModel  # noqa: E402
from euphonium.sampler import preset, rollout  # noqa: E402

CATEGORIES = (
    "model forward (rollout)",
    "model forward (train)",
    "model backward",
    "euphonium ops",
    "PRM gradient",
    "decode + rewards",
    "optimizer",
    "other",
)

# Wan2.1-T2V-1.3B's transformer config (the diffusers checkpoint's config.json).
WAN_1_3B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
WAN_TINY = dict(
    WAN_1_3B,
    num_attention_heads=2,
    attention_head_dim=16,
    text_dim=64,
    freq_dim=32,
    ffn_dim=64,
    num_layers=1,
    rope_max_seq_len=64,
)


class StepTimer:
    """Wall time per category; on CUDA each boundary synchronises so time lands in the right bucket.

    Buckets do not nest: time inside an open bucket stays in it (an op called by timed code is not
    counted twice).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: Dict[str, float] = defaultdict(float)
        self._open = False

    @contextlib.contextmanager
    def __call__(self, category: str):
        if self._open:
            yield
            return
        self._open = True
        start = self.now()
        try:
            yield
        finally:
            self.totals[category] += self.now() - start
            self._open = False

    def wrap(self, fn: Callable, category: str) -> Callable:
        def timed(*args, **kwargs):
            with self(category):
                return fn(*args, **kwargs)

        return timed

    def now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()


@contextlib.contextmanager
def timed_ops(timer: StepTimer):
    """Route ``ops.sde_step`` (euphonium ops) and ``ops.reward_grad`` (PRM gradient) through the timer
    while the block runs: the sampler looks them up on ``euphonium.ops`` at each step."""
    originals = {name: getattr(ops, name) for name in ("sde_step", "reward_grad")}
    ops.sde_step = timer.wrap(originals["sde_step"], "euphonium ops")
    ops.reward_grad = timer.wrap(originals["reward_grad"], "PRM gradient")
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(ops, name, fn)


class Setup:
    """Everything one step needs: policy, its conditioning, PRM, rewards, optimizer, sampler config."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.device = device
        self.group_size = args.group_size
        if args.model == "toy":
            self._toy(args)
        else:
            self._wan(args)
        self.prm.requires_grad_(False).eval()
        self.optimizer = torch.optim.AdamW(self.transformer.parameters(), lr=1e-5, weight_decay=0.0)
        self.config = preset(
            "euphonium",
            num_steps=args.num_steps,
            guidance_start=args.num_steps - args.guided_steps,
            **({"step_noise": args.step_noise} if args.step_noise else {}),
        )

    def _toy(self, args):
        from euphonium.toy import world
        from euphonium.toy.model import build_toy_model, predict_velocity
        from euphonium.toy.rewards import toy_rewards

        transformer, text_encoder = build_toy_model()
        self.transformer = transformer.to(self.device).train()
        text_encoder = text_encoder.to(self.device).eval()
        self.dtype = torch.float32
        generator = torch.Generator().manual_seed(0)
        groups = args.batch // args.group_size
        self.prompts = [p for p in world.sample_prompts(groups, generator) for _ in range(args.group_size)]
        self.shape = (args.batch, world.CHANNELS, world.NUM_FRAMES, world.HEIGHT, world.WIDTH)
        self.prm = LatentRewardModel(in_channels=world.CHANNELS, text_dim=text_encoder.config.dim).to(self.device)
        self.encode = lambda: text_encoder.encode(self.prompts).detach()
        self.velocity = lambda x, sigma, cond: predict_velocity(self.transformer, x, sigma, cond)
        self.rewards = lambda x0: toy_rewards(world.latents_to_video(x0), self.prompts)["combined"]
        self.description = (
            f"toy WanTransformer3DModel ({sum(p.numel() for p in transformer.parameters()):,} parameters)"
        )

    def _wan(self, args):
        from diffusers import AutoencoderKLWan, WanTransformer3DModel

        from euphonium.models.diffusers import Conditioning, DiffusersFlowModel
        from euphonium.rewards.jpeg import JpegIncompressibility

        config = WAN_TINY if args.wan_tiny else WAN_1_3B
        self.dtype = torch.bfloat16
        with torch.device(self.device):
            transformer = _cast(WanTransformer3DModel(**config), self.dtype)
            vae = _cast(AutoencoderKLWan(base_dim=16 if args.wan_tiny else 96), self.dtype).eval()
        transformer.enable_gradient_checkpointing()
        self.transformer = transformer.train()
        self.shape = (args.batch, *args.latent_shape)
        text_tokens = 8 if args.wan_tiny else 512
        embeds = torch.randn(args.batch, text_tokens, config["text_dim"], device=self.device, dtype=self.dtype)
        self.prompts = [f"prompt {b // args.group_size}" for b in range(args.batch)]
        self.prm = LatentRewardModel(in_channels=16, text_dim=config["text_dim"]).to(self.device)
        self.encode = lambda: Conditioning(prompt_embeds=embeds)
        self.velocity = DiffusersFlowModel(self.transformer)
        reward = JpegIncompressibility()
        mean = torch.tensor(vae.config.latents_mean, device=self.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=self.device).view(1, -1, 1, 1, 1)

        def rewards(x0):
            with torch.no_grad():
                video = vae.decode((x0.float() * std + mean).to(self.dtype)).sample  # [B, 3, F, H, W] in [-1, 1]
            return reward(((video.float() + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4), self.prompts)

        self.rewards = rewards
        self.description = (
            f"Wan2.1-1.3B-shaped WanTransformer3DModel{' (tiny)' if args.wan_tiny else ''} "
            f"({sum(p.numel() for p in transformer.parameters()):,} parameters, bf16)"
        )


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` in ``dtype`` except the modules diffusers keeps in float32 (``_keep_in_fp32_modules``),
    as ``from_pretrained(torch_dtype=dtype)`` loads a real checkpoint."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, module in model.named_modules():
        path = set(name.split("."))
        for key, param in module.named_parameters(recurse=False):
            if not keep & (path | {key}):
                param.data = param.data.to(dtype)
        for key, buf in module.named_buffers(recurse=False):
            if buf.is_floating_point() and not keep & (path | {key}):
                module._buffers[key] = buf.to(dtype)
    return model


def train_step(setup: Setup, timer: StepTimer, train_steps: int) -> Dict[str, float]:
    """One rollout + update; returns the loss statistics of the last trained step."""
    with timed_ops(timer):
        with timer("other"):
            cond = setup.encode()
        velocity = timer.wrap(setup.velocity, "model forward (rollout)")
        setup.transformer.eval()
        traj = rollout(
            velocity,
            cond,
            setup.config,
            shape=setup.shape,
            prm=setup.prm,
            group_size=setup.group_size,
            dtype=setup.dtype,
            device=setup.device,
            seed=0,
        )

        with timer("decode + rewards"):
            outcome = setup.rewards(traj.x0)
        with timer("euphonium ops"):
            adv_o, adv_p = ops.dual_reward_advantages(
                {"outcome": outcome}, traj.process_reward, guided=traj.guided, group_size=setup.group_size
            )

        setup.transformer.train()
        columns = list(range(traj.num_sde_steps))[-train_steps:]
        stats = {}
        for j in columns:
            sigma, _, _ = traj.step_args(j)
            sigma_b = torch.full((setup.shape[0],), sigma, device=setup.device)
            with timer("model forward (train)"):
                v = setup.velocity(traj.x[:, j], sigma_b, cond)
            with timer("euphonium ops"):
                log_prob = traj.recompute_log_prob(j, v).unsqueeze(1)
                loss, stats = ops.dual_reward_loss(
                    log_prob,
                    traj.log_prob[:, j : j + 1],
                    adv_o,
                    adv_p[:, j : j + 1],
                    guided=traj.guided[j : j + 1],
                )
            marks = {}

            def mark(grad, marks=marks):
                marks["v"] = timer.now()  # d loss / d v is ready: the ops' backward is done

            v.register_hook(mark)
            t0 = timer.now()
            (loss / len(columns)).backward()
            t1 = timer.now()
            timer.totals["euphonium ops"] += marks["v"] - t0
            timer.totals["model backward"] += t1 - marks["v"]
        with timer("optimizer"):
            setup.optimizer.step()
            setup.optimizer.zero_grad(set_to_none=True)
    return stats


def measure(setup: Setup, steps: int, train_steps: int) -> Dict[str, List[float]]:
    """Per-category seconds of each of ``steps`` timed steps (after one untimed warm-up step)."""
    train_step(setup, StepTimer(setup.device), train_steps)
    per_step: Dict[str, List[float]] = defaultdict(list)
    for _ in range(steps):
        timer = StepTimer(setup.device)
        start = timer.now()
        train_step(setup, timer, train_steps)
        total = timer.now() - start
        timer.totals["other"] += total - sum(timer.totals.values())
        for c in CATEGORIES:
            per_step[c].append(timer.totals.get(c, 0.0))
        per_step["total"].append(total)
    return per_step


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=["toy", "wan"], default="toy")
    parser.add_argument("--wan-tiny", action="store_true", help="a 1-layer Wan-shaped model (checks the path on a CPU)")
    parser.add_argument("--batch", type=int, default=None, help="samples per step (toy 16, wan 2)")
    parser.add_argument("--group-size", type=int, default=None, help="samples per prompt (toy 4, wan 2)")
    parser.add_argument(
        "--latent-shape",
        type=lambda s: tuple(int(d) for d in s.split("x")),
        default=None,
        help="wan: C x F x H x W of one latent (default 16x21x60x104: 480p, 81 frames)",
    )
    parser.add_argument("--num-steps", type=int, default=16, help="rollout steps (euphonium preset: 16)")
    parser.add_argument("--guided-steps", type=int, default=4, help="PRM-guided last steps (euphonium preset: 4)")
    parser.add_argument(
        "--train-steps", type=int, default=None, help="trained SDE steps, the last ones (toy: all, wan: 4)"
    )
    parser.add_argument(
        "--step-noise",
        choices=["auto", "kernel", "generator"],
        default=None,
        help="the sampler's step noise (default: the preset's 'auto': in-kernel Philox on CUDA, "
        "the rollout generator's torch.randn elsewhere)",
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    toy = args.model == "toy"
    args.batch = args.batch or (16 if toy else 2)
    args.group_size = args.group_size or (4 if toy else 2)
    if args.batch % args.group_size:
        raise SystemExit(f"--group-size {args.group_size} must divide --batch {args.batch}")
    args.latent_shape = args.latent_shape or ((16, 3, 8, 8) if args.wan_tiny else (16, 21, 60, 104))
    if not 1 <= args.guided_steps <= args.num_steps:
        raise SystemExit(f"--guided-steps must be in [1, {args.num_steps}]")
    train_steps = args.train_steps or (args.num_steps if toy else 4)
    if not 1 <= train_steps <= args.num_steps:
        raise SystemExit(f"--train-steps must be in [1, {args.num_steps}]")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    setup = Setup(args, device)
    per_step = measure(setup, args.steps, train_steps)
    total = statistics.mean(per_step["total"])
    rows = [
        {"category": c, "mean_s": statistics.mean(per_step[c]), "share": statistics.mean(per_step[c]) / total}
        for c in CATEGORIES
    ]
    info = describe_device(device)
    name = f"train_step_{args.model}{'_tiny' if args.model == 'wan' and args.wan_tiny else ''}"
    print(f"# {name}: {setup.description}")
    print(
        f"# device: {info['name']}; batch {args.batch} (groups of {args.group_size}), latent {setup.shape}, "
        f"{args.num_steps} rollout steps ({args.guided_steps} guided), {train_steps} trained; "
        f"euphonium backend: {ops._backend.resolve(device)}"
    )
    print(f"{'category':<26}{'mean s/step':>12}{'share':>8}")
    for r in rows:
        print(f"{r['category']:<26}{r['mean_s']:>12.4f}{100 * r['share']:>7.1f}%")
    print(f"{'total':<26}{total:>12.4f}{100.0:>7.1f}%   (steps: {', '.join(f'{t:.3f}' for t in per_step['total'])} s)")
    if args.no_save:
        return rows
    payload = {
        "bench": name,
        "device": info,
        "model": setup.description,
        "euphonium_backend": ops._backend.resolve(device, torch_path=True),
        "config": dict(
            batch=args.batch,
            group_size=args.group_size,
            latent=list(setup.shape),
            num_steps=args.num_steps,
            guided_steps=args.guided_steps,
            train_steps=train_steps,
            step_noise=setup.config.step_noise_source(device),
            timed_steps=args.steps,
            sampler="euphonium preset",
        ),
        "total_s": total,
        "steps_s": per_step["total"],
        "breakdown": rows,
        "per_step": {c: per_step[c] for c in CATEGORIES},
        "command": " ".join(["train_step.py", *sys.argv[1:]]),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    directory = args.out / info["slug"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    with open(directory / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["category", "mean_s", "share"])
        writer.writeheader()
        writer.writerows(rows)
    _plot(payload, directory / f"{name}.png")
    shown = (directory / name).relative_to(ROOT) if directory.is_relative_to(ROOT) else directory / name
    print(f"# wrote {shown}.{{json,csv,png}}")
    return rows


def _plot(payload, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["breakdown"] if r["mean_s"] > 0]
    fig, ax = plt.subplots(figsize=(9, 2.2))
    left = 0.0
    for r in rows:
        ax.barh([0], [r["share"] * 100], left=left, label=f"{r['category']} {100 * r['share']:.0f}%")
        left += r["share"] * 100
    ax.set_xlim(0, 100)
    ax.set_yticks([])
    ax.set_xlabel(f"share of one training step ({payload['total_s']:.2f} s)")
    ax.set_title(f"{payload['model']} on {payload['device']['name']}", fontsize=8)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
