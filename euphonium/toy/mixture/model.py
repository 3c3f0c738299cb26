"""The mixture world's base model: a small MLP flow model with a diffusers transformer's call signature.

``MixtureFlowModel(hidden_states [B, D, 1, 1, 1], timestep [B] (= 1000 sigma), encoder_hidden_states
[B, L, E], return_dict=False) -> (v,)``: exactly how :class:`~euphonium.models.diffusers.DiffusersFlowModel`
calls a ``WanTransformer3DModel``, so the sampler, the ops and the trainer treat it as they treat Wan.
A diffusers ``ModelMixin``/``ConfigMixin``: ``save_pretrained``/``from_pretrained`` (safetensors).

Pretraining (:func:`pretrain_mixture_model`) is flow matching on samples of the world's mis-weighted
mixture (``x_sigma = (1 - sigma) x0 + sigma eps``, target ``v = eps - x0``), seeded and deterministic
for a given thread count; the committed weights (``euphonium/assets/mixture/model``) are its output
with the defaults.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import platform
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from euphonium.models.diffusers import Conditioning, DiffusersFlowModel
from euphonium.sampler import SamplerConfig, Trajectory, preset, rollout
from euphonium.toy.mixture.world import (
    TARGET,
    MixtureOraclePRM,
    MixtureWorld,
    default_world,
    latents_to_video,
    video_to_latents,
)

ASSET_DIR = Path(__file__).resolve().parents[2] / "assets" / "mixture"
MODEL_DIR = ASSET_DIR / "model"


class _Block(nn.Module):
    """``h + W2 SiLU(W1 (LayerNorm(h) (1 + scale) + shift))`` with ``(scale, shift)`` from the condition."""

    def __init__(self, hidden: int, cond: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.modulation = nn.Linear(cond, 2 * hidden)
        self.fc1 = nn.Linear(hidden, 2 * hidden)
        self.fc2 = nn.Linear(2 * hidden, hidden)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.modulation(cond).chunk(2, dim=-1)
        return h + self.fc2(F.silu(self.fc1(self.norm(h) * (1 + scale) + shift)))


class MixtureFlowModel(ModelMixin, ConfigMixin):
    """Velocity model ``v_theta(x_sigma, sigma, prompt)`` for points in ``R^D``, called like a diffusers transformer.

    ``c = TimestepEmbedding(sinusoid(timestep)) + MLP(mean_L(encoder_hidden_states))``;
    ``h = Linear(x)``, then ``num_layers`` residual MLP blocks modulated by ``c`` (adaLN), then
    ``v = Linear(SiLU(LayerNorm(h)))``. ``hidden_states`` is ``[B, D, 1, 1, 1]`` (the sampler's video
    layout; any ``[B, ...]`` with ``D`` values per sample works) and ``v`` has its shape.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self, in_channels: int = 24, text_dim: int = 32, hidden_dim: int = 128, num_layers: int = 3, freq_dim: int = 64
    ):
        super().__init__()
        self.time_proj = Timesteps(freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(freq_dim, hidden_dim)
        self.text_embed = nn.Sequential(nn.Linear(text_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))
        self.proj_in = nn.Linear(in_channels, hidden_dim)
        self.blocks = nn.ModuleList(_Block(hidden_dim, hidden_dim) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(hidden_dim)
        self.proj_out = nn.Linear(hidden_dim, in_channels)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        return_dict: bool = True,
        attention_kwargs: Optional[dict] = None,
    ):
        batch = hidden_states.shape[0]
        x = hidden_states.reshape(batch, -1)
        if x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"hidden_states must hold {self.config.in_channels} values per sample, got {tuple(hidden_states.shape)}"
            )
        dtype = self.proj_in.weight.dtype
        timestep = torch.as_tensor(timestep, device=x.device)
        timestep = timestep.expand(batch) if timestep.dim() == 0 else timestep
        text = encoder_hidden_states.to(dtype)
        text = text.mean(dim=1) if text.dim() == 3 else text
        cond = self.time_embed(self.time_proj(timestep).to(dtype)) + self.text_embed(text)
        h = self.proj_in(x.to(dtype))
        for block in self.blocks:
            h = block(h, cond)
        v = self.proj_out(F.silu(self.norm_out(h))).view(hidden_states.shape)
        if not return_dict:
            return (v,)
        return Transformer2DModelOutput(sample=v)


def build_mixture_model(world: Optional[MixtureWorld] = None, seed: int = 0, **config) -> MixtureFlowModel:
    """A freshly initialised :class:`MixtureFlowModel` for ``world`` (float32, CPU), deterministic from ``seed``."""
    world = world if world is not None else default_world()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MixtureFlowModel(in_channels=world.dim, text_dim=world.config.embed_dim, **config)


def load_mixture_model(
    path: Union[str, Path, None] = None, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32
) -> MixtureFlowModel:
    """The pretrained model in eval mode (``path=None``: the committed ``euphonium/assets/mixture/model``)."""
    path = Path(path) if path is not None else MODEL_DIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no mixture model at {path}: config.json is missing (pretrain one with `python -m euphonium.toy.mixture`)"
        )
    return MixtureFlowModel.from_pretrained(path, torch_dtype=dtype).to(device).eval()


@dataclasses.dataclass
class MixturePretrainConfig:
    """Settings of :func:`pretrain_mixture_model` (the defaults made the committed weights).

    Noise levels: with probability ``uniform_fraction`` uniform in [0, 1], else logit-normal
    ``sigmoid(N(logit_mean, logit_std^2))``. AdamW with linear warm-up and cosine decay to 10% of
    ``lr``; the saved weights are an EMA (``ema_decay``).
    """

    steps: int = 3000
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.998
    uniform_fraction: float = 0.5
    logit_mean: float = 0.0
    logit_std: float = 1.0
    hidden_dim: int = 128
    num_layers: int = 3
    seed: int = 0
    threads: Optional[int] = 1

    def __post_init__(self):
        for name in ("steps", "batch_size", "hidden_dim", "num_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0 or not self.grad_clip > 0 or not self.logit_std > 0:
            raise ValueError("lr, grad_clip and logit_std must be > 0")
        if not 0 <= self.ema_decay < 1 or not 0 <= self.uniform_fraction <= 1:
            raise ValueError("ema_decay must be in [0, 1) and uniform_fraction in [0, 1]")


def pretrain_mixture_model(
    config: Optional[MixturePretrainConfig] = None,
    world: Optional[MixtureWorld] = None,
    output: Union[str, Path, None] = None,
    progress: bool = False,
) -> Dict[str, object]:
    """Flow-matching pretraining on the world's mixture; returns ``{"model": EMA model (eval), "record": ...}``.

    Each step draws ``batch_size`` prompts uniformly, ``x0`` from their mixtures, ``eps`` and ``sigma``,
    and regresses ``v_theta(x_sigma, sigma, prompt)`` on ``eps - x0``. With ``output`` the EMA model and
    ``pretrain.json`` (config, loss curve, wall and CPU seconds) are written there.
    """
    config = config if config is not None else MixturePretrainConfig()
    world = world if world is not None else default_world()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    model = build_mixture_model(world, config.seed, hidden_dim=config.hidden_dim, num_layers=config.num_layers)
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def lr_factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        done = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * done))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    gen = torch.Generator().manual_seed(config.seed)
    embeddings = world.embeddings
    losses: List[float] = []
    start, start_cpu = time.perf_counter(), time.process_time()
    for step in range(config.steps):
        index = torch.randint(world.num_prompts, (config.batch_size,), generator=gen)
        x0 = world.sample(index, gen)[0].float()
        eps = torch.randn(x0.shape, generator=gen)
        u = torch.rand(config.batch_size, generator=gen)
        n = torch.randn(config.batch_size, generator=gen)
        uniform = torch.rand(config.batch_size, generator=gen) < config.uniform_fraction
        sigma = torch.where(uniform, u, torch.sigmoid(config.logit_mean + config.logit_std * n))
        s = sigma.view(-1, 1)
        x_sigma = (1 - s) * x0 + s * eps
        v = model(
            x_sigma.view(-1, world.dim, 1, 1, 1), sigma * 1000, embeddings[index].unsqueeze(1), return_dict=False
        )[0]
        loss = F.mse_loss(v.view(-1, world.dim), eps - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if progress and (step + 1) % 500 == 0:
            print(f"step {step + 1}: loss {sum(losses[-500:]) / 500:.4f}", flush=True)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    tail = max(1, config.steps // 10)
    record = {
        "config": dataclasses.asdict(config),
        "world": dataclasses.asdict(world.config),
        "loss_every_100_steps": [
            sum(losses[i : i + 100]) / len(losses[i : i + 100]) for i in range(0, len(losses), 100)
        ],
        "final_loss": sum(losses[-tail:]) / tail,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if output is not None:
        output = Path(output)
        ema.save_pretrained(output)
        (output / "pretrain.json").write_text(json.dumps(record, indent=1) + "\n")
    return {"model": ema, "record": record}


def mixture_sampler_config(name: str = "euphonium_fast", **overrides) -> SamplerConfig:
    """``preset(name, **overrides)`` as the mixture world evaluates it: the preset's steps and shift with
    deterministic Euler steps (``schedule="ode"``, no window, no guidance) unless ``overrides`` say otherwise."""
    ode = dict(
        schedule="ode",
        guidance=False,
        same_initial_noise=False,
        sde_window=None,
        sde_window_size=None,
        sde_window_range=None,
    )
    return preset(name, **{**ode, **overrides})


@torch.no_grad()
def sample_mixture(
    model: torch.nn.Module,
    prompts: Sequence[str],
    *,
    world: Optional[MixtureWorld] = None,
    config: Optional[SamplerConfig] = None,
    prm=None,
    seed: int = 0,
) -> Tuple[Trajectory, torch.Tensor]:
    """Roll ``model`` out for ``prompts`` with :func:`euphonium.sampler.rollout` through
    :class:`~euphonium.models.diffusers.DiffusersFlowModel` (the trainer's path).

    ``config`` defaults to :func:`mixture_sampler_config` (``euphonium_fast``'s 10 steps, shift 3, ODE).
    Returns ``(trajectory, prompt_embeds [B, 1, E])``.
    """
    world = world if world is not None else default_world()
    config = config if config is not None else mixture_sampler_config()
    embeds = world.encode(list(prompts))
    traj = rollout(
        DiffusersFlowModel(model),
        Conditioning(prompt_embeds=embeds),
        config,
        shape=(len(prompts), *world.latent_shape),
        prm=prm,
        seed=seed,
    )
    return traj, embeds


@torch.no_grad()
def measure_base_rates(
    model: torch.nn.Module,
    *,
    world: Optional[MixtureWorld] = None,
    config: Optional[SamplerConfig] = None,
    samples_per_prompt: int = 64,
    seed: int = 0,
    batch_size: int = 1024,
) -> Dict[str, float]:
    """The model's rates of the prompted mode and component against the data's.

    Samples ``samples_per_prompt`` points per prompt (:func:`sample_mixture`), decodes them as the
    trainer does and scores them with :func:`~euphonium.toy.mixture.world.mixture_rewards`. Returns
    ``model/<part>`` (mean reward: ``mode``, ``component``, ``combined``), ``model/<part>_stderr``,
    ``data/<part>`` (the data's exact mean reward = prior weight, :meth:`MixtureWorld.base_rates`) and
    ``model/hard_mode``, ``model/hard_component`` (the fraction of samples whose most probable
    component is in the prompted mode / is the prompted component).
    """
    world = world if world is not None else default_world()
    prompts = [p for p in world.prompts for _ in range(samples_per_prompt)]
    parts: Dict[str, List[torch.Tensor]] = {}
    for i, start in enumerate(range(0, len(prompts), batch_size)):
        batch = prompts[start : start + batch_size]
        traj, _ = sample_mixture(model, batch, world=world, config=config, seed=seed + i)
        x0 = video_to_latents(latents_to_video(traj.x0))
        index = world.prompt_index(batch)
        post = world.posterior(x0, 0.0, index)
        values = world.rewards_of_posterior(post)
        best = post.flatten(1).argmax(dim=1)
        values["hard_mode"] = (best // world.config.num_subclusters == TARGET[0]).double()
        values["hard_component"] = (best == TARGET[0] * world.config.num_subclusters + TARGET[1]).double()
        for k, v in values.items():
            parts.setdefault(k, []).append(v)
    out: Dict[str, float] = {}
    for k, chunks in parts.items():
        v = torch.cat(chunks)
        out[f"model/{k}"] = float(v.mean())
        out[f"model/{k}_stderr"] = float(v.std() / math.sqrt(v.numel()))
    out.update({f"data/{k}": v for k, v in world.base_rates().items()})
    return out


@torch.no_grad()
def oracle_calibration(
    model: torch.nn.Module,
    *,
    world: Optional[MixtureWorld] = None,
    config: Optional[SamplerConfig] = None,
    sigmas: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 0.9),
    samples_per_prompt: int = 64,
    seed: int = 0,
) -> List[Dict[str, float]]:
    """How exact the data's oracle PRM is for the base model's own samples.

    The oracle is ``E[r(x0) | x_sigma]`` under the data. For ``x0`` sampled by ``model``
    (:func:`sample_mixture`) and ``x_sigma = (1 - sigma) x0 + sigma eps`` the residual ``r(x0) - o(x_sigma)``
    has mean 0 when the model's distribution equals the data's. Per ``sigma``: ``bias`` (mean residual on
    the model's samples) with ``bias_stderr``, ``rmse``, and ``data_bias``/``data_bias_stderr`` (the same
    on as many data samples: 0 within its error, the reference).
    """
    world = world if world is not None else default_world()
    oracle = MixtureOraclePRM(world)
    prompts = [p for p in world.prompts for _ in range(samples_per_prompt)]
    index = world.prompt_index(prompts)
    embeds = world.encode(prompts)
    traj, _ = sample_mixture(model, prompts, world=world, config=config, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    sources = {"": video_to_latents(latents_to_video(traj.x0)), "data_": world.sample(index, gen)[0]}
    rows = []
    for sigma in sigmas:
        row = {"sigma": float(sigma)}
        for prefix, x0 in sources.items():
            reward = world.rewards(x0, index)["combined"]
            x = (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
            residual = reward - oracle(x, sigma, embeds)
            row[f"{prefix}bias"] = float(residual.mean())
            row[f"{prefix}bias_stderr"] = float(residual.std() / math.sqrt(residual.numel()))
            row[f"{prefix}rmse"] = float(residual.pow(2).mean().sqrt())
        rows.append(row)
    return rows
