"""``python -m euphonium.sample --checkpoint CKPT --out DIR [--config F] [--prompts F] [--rewards Y] [key=value ...]``

Samples and scores clips of a trained checkpoint with the run's evaluation sampler (the training
schedule as a deterministic ODE, no guidance), one process:

- prompts: ``--prompts`` (``.txt`` or ``.jsonl``; a ``.jsonl`` file's other fields are the metadata the
  rewards receive), initial noise from ``--seed``; by default the run's fixed evaluation set with its
  own noise, so the scores are the run's ``eval.jsonl`` row of that step (EMA weights);
- rewards: ``--rewards`` (a YAML mapping ``{name: {kwargs}}`` of registered rewards, every part weight 1)
  or the run's ``rewards`` and ``reward_weights``;
- config: ``--config`` (a file or packaged name) and ``key=value`` overrides, else the checkpoint's own.

Writes ``DIR/clips/NNNN.mp4`` (``.gif`` without a video encoder), ``DIR/scores.jsonl`` (per clip: index,
prompt, metadata, file, ``reward_mean`` and ``reward/<part>``) and ``DIR/summary.json`` (the means).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml


def load_trained_policy(config, weights: Dict[str, Any], device):
    """The run's :class:`~euphonium.train.policy.Policy` with ``weights`` (a checkpoint's trainable or EMA
    tensors) in its transformer: the LoRA adapter added as the trainer adds it (fp32), then every tensor
    copied in; a name the model lacks, or a trained parameter the checkpoint lacks, is an error."""
    import torch

    from euphonium.train.config import ConfigError
    from euphonium.train.policy import build_policy

    policy = build_policy(config, device)
    transformer = policy.transformer
    if config.model.lora_rank > 0:
        from peft import LoraConfig

        transformer.requires_grad_(False)
        transformer.add_adapter(
            LoraConfig(
                r=config.model.lora_rank,
                lora_alpha=config.model.lora_alpha or config.model.lora_rank,
                target_modules=list(config.model.lora_targets),
                init_lora_weights="gaussian",
            )
        )
        for p in transformer.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    named = dict(transformer.named_parameters())
    unknown = sorted(set(weights) - set(named))
    trained = {n for n, p in named.items() if p.requires_grad}
    missing = sorted(trained - set(weights))
    if unknown or missing:
        raise ConfigError(
            f"the checkpoint does not fit the model: unknown {unknown[:3]}, missing {missing[:3]} "
            "(another model or LoRA setting?)"
        )
    with torch.no_grad():
        for name, value in weights.items():
            named[name].copy_(value.to(device=named[name].device, dtype=named[name].dtype))
    transformer.requires_grad_(False)
    return policy


def reward_columns(parts: Dict[str, Any], weights: Optional[Dict[str, float]]) -> Dict[str, Any]:
    """``reward_mean`` (the weighted mean of the positively weighted parts, as the trainer logs it) and
    ``reward/<part>``."""
    used = {n: 1.0 for n in parts} if weights is None else {n: w for n, w in weights.items() if w > 0}
    total = sum(used.values())
    columns = {"reward_mean": sum(w * parts[n] for n, w in used.items()) / total}
    columns.update({f"reward/{name}": value for name, value in parts.items()})
    return columns


def sample_checkpoint(
    checkpoint,
    out,
    *,
    config=None,
    prompts_file: Optional[str] = None,
    rewards: Optional[Dict[str, Dict[str, Any]]] = None,
    weights: str = "ema",
    seed: Optional[int] = None,
    batch_size: Optional[int] = None,
) -> Dict[str, Any]:
    """Sample and score (see the module docstring); returns the summary written to ``out/summary.json``."""
    import torch

    from euphonium.export import checkpoint_config, load_run, select_weights
    from euphonium.models.diffusers import DiffusersFlowModel
    from euphonium.rewards import RewardSet, build_reward
    from euphonium.sampler import preset
    from euphonium.train.config import ConfigError
    from euphonium.train.evaluation import Evaluator
    from euphonium.train.logging import clip_frames, write_clip
    from euphonium.train.prompts import evaluation_set, prompt_metadata, read_prompt_file
    from euphonium.train.rng import RandomStreams

    out = Path(out)
    path, loaded = load_run(checkpoint)
    config = config if config is not None else checkpoint_config(loaded)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
    )
    policy = load_trained_policy(config, select_weights(loaded, weights), device)
    streams = RandomStreams(config.seed)
    if prompts_file is not None:
        prompts, metadata = read_prompt_file(prompts_file, "--prompts")
        generator = torch.Generator().manual_seed(config.seed if seed is None else seed)
    else:
        prompts = evaluation_set(config, policy.prompts, streams.generator("eval_prompts"))
        table = prompt_metadata(config)
        metadata = [table.get(p, {}) for p in prompts]
        generator = streams.generator("eval_noise")  # the run's evaluation noise: its eval.jsonl scores
    noise = torch.randn((len(prompts), *policy.latent_shape), generator=generator)
    try:
        if rewards is None:
            reward_set = RewardSet(
                {n: build_reward(n, **kw) for n, kw in config.rewards.items()}, weights=config.reward_weights
            )
            weights_used = config.reward_weights
        else:
            reward_set = RewardSet({n: build_reward(n, **(kw or {})) for n, kw in rewards.items()})
            weights_used = None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"rewards: {err}") from None
    model = DiffusersFlowModel(
        policy.transformer, cfg_scale=config.model.cfg_scale, attention_backend=config.model.attention_backend
    )
    sampler = preset(config.algorithm, **config.sampler)
    batch = batch_size or config.prompts_per_step * config.group_size
    evaluator = Evaluator(
        policy, model, sampler, reward_set, lambda parts: parts, prompts, generator,
        ema=None, device=device, rank=0, world=1, batch=batch,
    )  # fmt: skip
    (out / "clips").mkdir(parents=True, exist_ok=True)
    rows: List[Dict[str, Any]] = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch):
            chunk = slice(start, start + batch)
            videos = evaluator.sample(prompts[chunk], noise=noise[chunk])
            scores = reward_set(videos, prompts[chunk], metadata=metadata[chunk])
            columns = reward_columns(scores.parts, weights_used)
            for i, video in enumerate(videos):
                index = start + i
                file = write_clip(clip_frames(video[None]), out / "clips" / f"{index:04d}")
                row = {"index": index, "prompt": prompts[index], "metadata": metadata[index]}
                row["file"] = str(file.relative_to(out))
                row.update({k: float(v[i]) for k, v in columns.items()})
                rows.append(row)
    (out / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    keys = [k for k in rows[0] if k == "reward_mean" or k.startswith("reward/")]
    summary = {
        "checkpoint": str(path),
        "step": int(loaded["state"]["step"]),
        "weights": "ema" if weights == "ema" and loaded.get("ema") is not None else "trained",
        "prompts": prompts_file or "evaluation set",
        "clips": len(rows),
        **{k: sum(r[k] for r in rows) / len(rows) for k in keys},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m euphonium.sample", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder or a run folder (its newest)")
    parser.add_argument("--out", required=True, help="where clips, scores.jsonl and summary.json go")
    parser.add_argument("--config", help="the run's config (file or packaged name); default: the checkpoint's")
    parser.add_argument("--prompts", help=".txt or .jsonl prompts; default: the run's evaluation set")
    parser.add_argument("--rewards", help="YAML mapping {name: {kwargs}}; default: the run's rewards")
    parser.add_argument("--weights", default="ema", choices=("ema", "trained"))
    parser.add_argument("--seed", type=int, help="initial noise of --prompts (default: the run's seed)")
    parser.add_argument("--batch-size", type=int, help="clips per forward (default: the training batch)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.path=/data/wan")
    args = parser.parse_args(argv)
    from euphonium.checkpointing import CheckpointError
    from euphonium.export import ExportError, checkpoint_config, load_run
    from euphonium.train.config import ConfigError, _set_path, load_config, parse_override

    try:
        if args.config is not None:
            config = load_config(args.config, args.overrides)
        elif args.overrides:
            config = checkpoint_config(load_run(args.checkpoint)[1])
            for text in args.overrides:
                _set_path(config, *parse_override(text))
            config.validate()
        else:
            config = None
        rewards = None
        if args.rewards is not None:
            rewards = yaml.safe_load(args.rewards)
            if not isinstance(rewards, dict) or not rewards:
                raise ConfigError(f"--rewards must be a YAML mapping {{name: {{kwargs}}}}, got {args.rewards!r}")
        summary = sample_checkpoint(
            args.checkpoint,
            args.out,
            config=config,
            prompts_file=args.prompts,
            rewards=rewards,
            weights=args.weights,
            seed=args.seed,
            batch_size=args.batch_size,
        )
    except (ConfigError, ExportError, CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
