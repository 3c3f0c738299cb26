"""PRM data from any configured model: rollouts of a ``TrainConfig``'s family through the trainer's own
policy builder, sampler and reward set, written in resumable shards; loading them; the report's measures.

Layout of a collection folder ``DIR``::

    DIR/collect.json           what was collected: the model settings, prompts, rewards and weights, sampler,
                               seed, shard and group size, stored dtype (a rerun must match these, else it
                               refuses; num_samples may grow), and the config name and overrides given
    DIR/shard-000000.safetensors
    DIR/shard-000001.safetensors ...

Sample ``i`` belongs to shard ``i // shard_size`` and its prompt group ``i // group_size``; the prompt of
group ``g`` is ``prompts[perm[g % len(prompts)]]`` (``perm`` a permutation seeded by ``seed``) and the
shard's rollouts are seeded by ``(seed, shard)``: the data does not depend on how many processes collect
it nor on how often it was interrupted. Under ``torchrun`` rank ``r`` of ``W`` collects the shards
``k`` with ``k % W == r``. Each shard is written under a temporary name and renamed when complete, so a
rerun with the same arguments skips the shards that exist and collects the rest.

A shard holds ``x0 [n, C, F, H, W]`` (the stored dtype), ``prompt_embeds [n, D]`` (pooled, what the conv
PRM reads), ``prompt_tokens [u, L, D]`` with ``prompt_index [n]`` (the per-token text conditioning of the
``u`` distinct prompts in the shard, what the backbone PRM reads), ``cond.<name> [n, ...]`` (the rest of the
policy's conditioning, ``Conditioning.kwargs``: SD3's and FLUX's ``pooled_projections``, the embedded
``guidance`` of FLUX and HunyuanVideo, HunyuanVideo's ``encoder_attention_mask``; the backbone PRM calls its
transformer with them), ``rewards [n]``, ``parts.<name> [n]`` (every named reward part) and
``sample_index [n]``; the prompt strings in its metadata.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from euphonium.rewards.prm.data import SIGMA_BUCKETS, PRMDataset, noise_latents, spearman, split_conditioning
from euphonium.rewards.prm.model import pool_prompt_embeds

SHARD_FORMAT = "euphonium.prm_shard.v1"
STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Model settings the base model's rollouts do not depend on (a collection may be resumed with them changed).
_TRAINING_ONLY = ("lora_rank", "lora_alpha", "lora_targets", "gradient_checkpointing")


def shard_path(out_dir: Union[str, Path], index: int) -> Path:
    return Path(out_dir) / f"shard-{index:06d}.safetensors"


def _valid_shard(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == SHARD_FORMAT
    except Exception:
        return False


def collection_config(config):
    """The config the collection builds its policy and sampler from: ``config`` with guidance off and no
    process credit (the PRM is what is being made; the rollouts are the base model's under the trainer's
    own sampler otherwise)."""
    config = copy.deepcopy(config)
    config.sampler = {**config.sampler, "guidance": False}
    config.process_advantage = None
    return config


def build_reward_set(config, device: torch.device):
    """The trainer's reward set of ``config`` (every reward and its named parts, the weights, prompt metadata)."""
    from euphonium.rewards import RewardSet, build_reward
    from euphonium.train.prompts import prompt_metadata

    return RewardSet(
        {name: build_reward(name, **values) for name, values in config.rewards.items()},
        weights=config.reward_weights,
        prompt_metadata=prompt_metadata(config),
    )


def _group_prompts(prompts: Sequence[str], seed: int, first: int, count: int, group_size: int) -> List[str]:
    perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    return [prompts[perm[((first + j) // group_size) % len(prompts)]] for j in range(count)]


def _check_manifest(out_dir: Path, manifest: Dict) -> None:
    path = out_dir / "collect.json"
    if path.is_file():
        old = json.loads(path.read_text())
        # What the data depends on must match; how it was asked for (config name, override order) need not.
        free = ("num_samples", "config", "overrides")
        diff = sorted(k for k in set(old) | set(manifest) if k not in free and old.get(k) != manifest.get(k))
        if diff:
            raise ValueError(
                f"{out_dir} holds a collection made with other settings ({', '.join(diff)} differ): "
                "give another --out, or the same arguments to resume it"
            )


def collect_shards(
    config,
    out_dir: Union[str, Path],
    num_samples: int,
    *,
    shard_size: int = 64,
    batch_size: Optional[int] = None,
    seed: int = 0,
    store_dtype: str = "float32",
    overrides: Sequence[str] = (),
    config_name: Optional[str] = None,
    progress: bool = True,
) -> Dict:
    """Collect ``num_samples`` rollouts of ``config``'s model into shards under ``out_dir`` (see the module doc).

    ``batch_size``: rollouts per sampler call (default ``prompts_per_step * group_size`` of the config, the
    trainer's own batch); it must divide ``shard_size``, and ``config.group_size`` must divide both. Returns
    ``{"written": [shard indices this process wrote], "skipped": [...], "shards": total, "rank", "world"}``.
    """
    from euphonium.models.diffusers import DiffusersFlowModel
    from euphonium.sampler import preset, rollout
    from euphonium.train.distributed import init_distributed
    from euphonium.train.policy import build_policy, check_model_config, training_prompts, video_shape

    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"store_dtype must be one of {sorted(STORE_DTYPES)}, got {store_dtype!r}")
    group = config.group_size
    batch_size = batch_size or config.prompts_per_step * group
    for name, value in (("num_samples", num_samples), ("shard_size", shard_size), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if num_samples % group:
        raise ValueError(f"num_samples ({num_samples}) must be a multiple of group_size ({group})")
    if shard_size % batch_size or batch_size % group:
        raise ValueError(
            f"batch_size ({batch_size}) must divide shard_size ({shard_size}) and be a multiple of group_size ({group})"
        )
    config = collection_config(config)
    out_dir = Path(out_dir)
    rank, world, device = init_distributed()
    if config.device != "auto":
        device = torch.device(config.device)
    check_model_config(config)
    sampler = preset(config.algorithm, **config.sampler)
    rewards = build_reward_set(config, device)
    manifest = {
        "format": "euphonium.prm_collection.v1",
        "config": config_name,
        "overrides": list(overrides),
        "model": {
            k: v
            for k, v in json.loads(json.dumps(dataclasses.asdict(config.model), default=str)).items()
            if k not in _TRAINING_ONLY
        },
        "prompts": list(training_prompts(config)),
        "rewards": json.loads(json.dumps(config.rewards, default=str)),
        "reward_weights": dict(config.reward_weights),
        "seed": seed,
        "shard_size": shard_size,
        "group_size": group,
        "store_dtype": store_dtype,
        "num_samples": num_samples,
        "sampler": {k: v for k, v in sorted(vars(sampler).items()) if isinstance(v, (int, float, str, type(None)))},
        "video_shape": list(video_shape(config)),
    }
    _check_manifest(out_dir, manifest)
    num_shards = math.ceil(num_samples / shard_size)
    mine = [k for k in range(num_shards) if k % world == rank]
    todo = [k for k in mine if not _valid_shard(shard_path(out_dir, k))]
    result = {
        "written": [],
        "skipped": sorted(set(mine) - set(todo)),
        "shards": num_shards,
        "rank": rank,
        "world": world,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out_dir / "collect.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if not todo:
        return result
    policy = build_policy(config, device)
    policy.transformer.requires_grad_(False)
    model = DiffusersFlowModel(
        policy.transformer, cfg_scale=config.model.cfg_scale, attention_backend=config.model.attention_backend
    )
    prompts = list(policy.prompts)
    total = sum(min(shard_size, num_samples - k * shard_size) for k in todo)
    bar = tqdm(total=total, desc=f"collect rank {rank}/{world}", unit="rollout", disable=not progress)
    for k in todo:
        first = k * shard_size
        count = min(shard_size, num_samples - first)
        shard_prompts = _group_prompts(prompts, seed, first, count, group)
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + k)
        chunks = []
        for start in range(0, count, batch_size):
            batch = shard_prompts[start : start + batch_size]
            with torch.no_grad():
                cond = policy.encode(batch)
                traj = rollout(
                    model,
                    cond,
                    sampler,
                    shape=(len(batch), *policy.latent_shape),
                    group_size=group,
                    seed=generator,
                    device=device,
                )
                out = rewards(policy.decode(traj.x0), batch)
            chunks.append((traj.x0, split_conditioning(cond), out))
            bar.update(len(batch))
        _write_shard(out_dir, k, first, shard_prompts, chunks, STORE_DTYPES[store_dtype])
        result["written"].append(k)
    bar.close()
    return result


def _write_shard(out_dir: Path, index: int, first: int, prompts: List[str], chunks, dtype: torch.dtype) -> Path:
    x0 = torch.cat([c[0].detach().float().cpu() for c in chunks]).to(dtype)
    embeds = torch.cat([c[1][0].detach().cpu() for c in chunks])
    unique = sorted(set(prompts), key=prompts.index)
    where = {p: prompts.index(p) for p in unique}
    tensors = {
        "x0": x0.contiguous(),
        "prompt_embeds": pool_prompt_embeds(embeds).float().contiguous(),
        "rewards": torch.cat([c[2].total.float().cpu() for c in chunks]),
        "sample_index": torch.arange(first, first + len(prompts), dtype=torch.int64),
        "prompt_index": torch.tensor([unique.index(p) for p in prompts], dtype=torch.int64),
    }
    if embeds.dim() == 3:
        tensors["prompt_tokens"] = embeds[[where[p] for p in unique]].contiguous()
    for name in chunks[0][1][1]:
        tensors[f"cond.{name}"] = torch.cat([c[1][1][name].detach().cpu() for c in chunks]).contiguous()
    for name in chunks[0][2].parts:
        tensors[f"parts.{name}"] = torch.cat([c[2].parts[name].float().cpu() for c in chunks])
    path = shard_path(out_dir, index)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"format": SHARD_FORMAT, "prompts": json.dumps(prompts)})
    os.replace(tmp, path)
    return path


def load_shards(out_dir: Union[str, Path], *, tokens: bool = False) -> PRMDataset:
    """All complete shards of a collection folder as one :class:`PRMDataset` (in sample order).

    ``tokens=False``: pooled prompt embeddings ``[N, D]`` (the conv PRM's); ``tokens=True``: the per-token
    conditioning ``[N, L, D]`` and the rest of the policy's conditioning as ``cond_kwargs`` (the backbone PRM's:
    each sample gets its prompt's tokens, so memory grows with ``N * L * D``).
    """
    out_dir = Path(out_dir)
    files = sorted(p for p in out_dir.glob("shard-*.safetensors") if _valid_shard(p))
    if not files:
        raise FileNotFoundError(f"no PRM shards in {out_dir} (python -m euphonium.prm collect --config ... --out DIR)")
    parts: List[PRMDataset] = []
    for path in files:
        t = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            prompts = json.loads(f.metadata()["prompts"])
        if tokens and "prompt_tokens" not in t:
            raise ValueError(f"{path} has no per-token prompt embeddings (a pooled-only family)")
        embeds = t["prompt_tokens"][t["prompt_index"]] if tokens else t["prompt_embeds"]
        parts.append(
            PRMDataset(
                x0=t["x0"],
                prompt_embeds=embeds,
                rewards=t["rewards"],
                prompts=prompts,
                parts={k[len("parts.") :]: v for k, v in t.items() if k.startswith("parts.")},
                cond_kwargs={k[len("cond.") :]: v for k, v in t.items() if k.startswith("cond.")} if tokens else {},
            )
        )
    return PRMDataset.concat(parts)


# --------------------------------------------------------------------------------------------------
# Report measures


@torch.no_grad()
def calibration_by_sigma(
    prm,
    data: PRMDataset,
    buckets: Sequence[Tuple[float, float]] = SIGMA_BUCKETS,
    *,
    bins: int = 10,
    seed: int = 0,
    batch_size: int = 16,
) -> List[Dict[str, float]]:
    """Per sigma bucket: Spearman of ``prm(x_sigma, sigma, prompt)`` with the outcome reward and its calibration
    as an estimate of ``E[r | x_sigma]``.

    Every sample is noised once at ``sigma ~ U[lo, hi]`` (seeded). ``calibration_error``: predictions sorted
    into ``bins`` equal-count bins, ``sum_bins (n_bin / n) |mean(pred) - mean(reward)|`` (reward units; a
    calibrated PRM's bin means agree); ``bias``: ``mean(pred - reward)``; ``rmse``.
    """
    device = next(prm.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for lo, hi in buckets:
        preds = []
        for start in range(0, len(data), batch_size):
            x0 = data.x0[start : start + batch_size].float()
            sigma = lo + (hi - lo) * torch.rand(x0.shape[0], generator=gen)
            x = noise_latents(x0, sigma, torch.randn(x0.shape, generator=gen))
            cond = data.condition(slice(start, start + batch_size), device)
            preds.append(prm(x.to(device), sigma.to(device), cond).float().cpu())
        p, t = torch.cat(preds), data.rewards
        order = torch.argsort(p)
        error = 0.0
        for chunk in torch.tensor_split(order, min(bins, len(order))):
            error += len(chunk) / len(order) * float((p[chunk].mean() - t[chunk].mean()).abs())
        rows.append(
            {
                "sigma_lo": lo,
                "sigma_hi": hi,
                "n": int(p.numel()),
                "spearman": spearman(p, t) if len(p) > 1 else float("nan"),
                "calibration_error": error,
                "bias": float((p - t).mean()),
                "rmse": float((p - t).pow(2).mean().sqrt()),
            }
        )
    return rows


@torch.no_grad()
def guided_step_win_rate(
    config,
    policy,
    prm,
    rewards,
    prompts: Sequence[str],
    rhos: Sequence[float],
    *,
    seed: int = 0,
    batch_size: int = 8,
    step: Optional[int] = None,
) -> List[Dict[str, float]]:
    """One guided step vs the same rollout unguided, per ``rho``: the trainer's sampler (``config``), guidance in
    its ``rho`` form (a shift of ``rho`` noise stds along the PRM's gradient) at the single SDE step ``step``
    (default: the first step of the preset's guidance range, else the first SDE step), same seed, same noise.
    A preset with a random SDE window (``sde_window_size``) gets that window fixed to start at ``step``.

    Returns per rho ``{"rho", "step", "n", "win_rate" (guided outcome reward higher), "loss_rate", "tie_rate",
    "mean_delta", "stderr_delta"}``.
    """
    from euphonium.models.diffusers import DiffusersFlowModel
    from euphonium.sampler import preset, rollout

    # Independent rollouts (no group-shared initial noise); each guided one paired with its unguided twin.
    settings = {**config.sampler, "same_initial_noise": False}
    base = preset(config.algorithm, **{**settings, "guidance": False})
    if step is None:
        guided = preset(config.algorithm, **{**settings, "guidance": True}).guidance_steps()
        step = guided[0] if guided else base.sde_window[0] if base.sde_window else 0
    if base.sde_window_size is not None:
        # A random SDE window would leave the step deterministic (unguided) in most rollouts: fix it to start there.
        end = min(step + base.sde_window_size, base.num_steps)
        settings.update(sde_window_size=None, sde_window_range=None, sde_window=(step, end))
        base = preset(config.algorithm, **{**settings, "guidance": False})
    device = next(prm.parameters()).device
    model = DiffusersFlowModel(
        policy.transformer, cfg_scale=config.model.cfg_scale, attention_backend=config.model.attention_backend
    )

    def outcome(sampler, batch, k):
        cond = policy.encode(batch)
        traj = rollout(
            model,
            cond,
            sampler,
            shape=(len(batch), *policy.latent_shape),
            prm=prm if sampler.guidance else None,
            seed=seed * 1_000_003 + k,
            device=device,
        )
        return rewards(policy.decode(traj.x0), batch).total.float().cpu()

    prompts = list(prompts)
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    unguided = torch.cat([outcome(base, b, k) for k, b in enumerate(batches)])
    rows = []
    for rho in rhos:
        sampler = preset(
            config.algorithm,
            **{
                **settings,
                "guidance": True,
                "guidance_form": "rho",
                "guidance_rho": float(rho),
                "guidance_start": step,
                "guidance_end": step + 1,
            },
        )
        delta = torch.cat([outcome(sampler, b, k) for k, b in enumerate(batches)]) - unguided
        n = delta.numel()
        rows.append(
            {
                "rho": float(rho),
                "step": step,
                "n": n,
                "win_rate": float((delta > 0).float().mean()),
                "loss_rate": float((delta < 0).float().mean()),
                "tie_rate": float((delta == 0).float().mean()),
                "mean_delta": float(delta.mean()),
                "stderr_delta": float(delta.std() / math.sqrt(n)) if n > 1 else float("nan"),
            }
        )
    return rows
