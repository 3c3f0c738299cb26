"""Flow-matching pretraining of the toy base model on clips from the renderer.

Each step draws ``batch_size`` prompts uniformly from :func:`~euphonium.toy.world.all_prompts`,
renders them (``x0``), draws ``eps ~ N(0, I)`` and a noise level per clip, and regresses the velocity::

    sigma = shift * s / (1 + (shift - 1) * s),  s = sigmoid(n),  n ~ N(logit_mean, logit_std^2)
    x_sigma = (1 - sigma) * x0 + sigma * eps
    loss = mean((v_theta(x_sigma, sigma, prompt) - (eps - x0))^2)

with AdamW, linear warm-up then cosine decay to 10% of ``lr``, and gradient-norm clipping. The prompt
encoder is trained jointly.

**Caption noise** (``caption_accuracy``, :func:`~euphonium.toy.world.noisy_captions`): the prompt the
model is conditioned on names each rendered attribute only with probability ``caption_accuracy[k]``
and another value otherwise, so the model learns to draw every value of every attribute but picks the
named one only at that rate, the choice falling to the sampling noise: preference errors that RL can
re-weight (DESIGN.md section 7). Empty: exact captions. With ``caption_coupling`` the choice is a
function of the clip's own noise ``eps``: the caption is drawn first and attribute ``k`` is rendered
from ``u_k = Phi(<eps, s_k> / sqrt(N))`` (:func:`noise_uniforms`, ``s_k`` a fixed +-1 pattern per
attribute, the four orthogonal), which is uniform and independent of the rest of ``eps``, so the data
(caption, clip) have exactly the caption-noise law, but the model learns to read the choice off the
initial noise instead of having to break a symmetry it cannot see: every sample then commits to one
value, and a sampler that re-draws noise early (an SDE window) re-draws the choice.

``init`` continues from a saved model (its architecture; ``transformer_config`` and
``text_encoder_config`` must then be empty).

The saved and evaluated weights are an exponential moving average of the trained ones
(``ema_decay``; ``0`` saves the raw weights), which gives much cleaner samples after a short, high
learning-rate run. Data, initialisation and noise come from one seed, so a run is reproducible on a
machine with the same thread count.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import platform
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from tqdm.auto import tqdm

from euphonium.toy import world
from euphonium.toy.model import (
    build_toy_model,
    count_parameters,
    load_toy_model,
    predict_velocity,
    sample_ode,
    save_toy_model,
)
from euphonium.toy.rewards import attribute_accuracy, toy_rewards

CLIP_LATENT_SHAPE = (world.CHANNELS, world.NUM_FRAMES, world.HEIGHT, world.WIDTH)


@dataclasses.dataclass
class PretrainConfig:
    """Settings of :func:`pretrain` (the defaults produced the committed weights)."""

    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 3.0
    seed: int = 0
    threads: Optional[int] = 2
    eval_every: int = 500
    eval_sample_steps: int = 20
    transformer_config: Dict[str, object] = dataclasses.field(default_factory=dict)
    text_encoder_config: Dict[str, object] = dataclasses.field(default_factory=dict)
    caption_accuracy: Dict[str, float] = dataclasses.field(default_factory=dict)
    caption_coupling: bool = False
    init: Optional[str] = None

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("lr", "logit_std", "shift", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be a positive integer or None, got {self.threads!r}")
        if self.caption_accuracy:
            world.noisy_captions(["a red square moving left"], dict(self.caption_accuracy), 0)  # validates
        if self.caption_coupling and not self.caption_accuracy:
            raise ValueError("caption_coupling needs caption_accuracy (which attributes the noise picks)")
        if self.init is not None and (self.transformer_config or self.text_encoder_config):
            raise ValueError("init continues a saved model with its own architecture: give no transformer_config")


def noise_pattern(attribute: str) -> torch.Tensor:
    """The +-1 pattern ``s_k`` ``[C, F, H, W]`` whose projection of the noise picks attribute ``k``'s value.

    colour ``(-1)^(h + w)``, shape ``(-1)^h``, size ``(-1)^f``, direction ``(-1)^w`` (the same in every
    channel): pairwise orthogonal, orthogonal to constants, and nearly so to the smooth clips.
    """
    f = torch.arange(world.NUM_FRAMES).view(1, -1, 1, 1)
    h = torch.arange(world.HEIGHT).view(1, 1, -1, 1)
    w = torch.arange(world.WIDTH).view(1, 1, 1, -1)
    exponent = {"color": h + w, "shape": h + 0 * w, "size": f + 0 * h + 0 * w, "direction": w + 0 * h}
    if attribute not in exponent:
        raise ValueError(f"attribute must be one of {world.ATTRIBUTES}, got {attribute!r}")
    sign = 1 - 2 * (exponent[attribute] % 2)
    return sign.expand(world.CHANNELS, world.NUM_FRAMES, world.HEIGHT, world.WIDTH).to(torch.float64)


def noise_uniforms(eps: torch.Tensor) -> torch.Tensor:
    """``[B, 4]`` float64 ``u_k = Phi(<eps, s_k> / sqrt(N))`` in [0, 1), one per attribute of
    :data:`~euphonium.toy.world.ATTRIBUTES`, for noise ``eps [B, C, F, H, W]``: uniform for
    ``eps ~ N(0, I)``, the four independent (orthogonal patterns), each independent of the rest of ``eps``."""
    flat = eps.double().flatten(1)
    patterns = torch.stack([noise_pattern(k).flatten() for k in world.ATTRIBUTES], dim=1)  # [N, 4]
    z = flat @ patterns / math.sqrt(flat.shape[1])
    return torch.special.ndtr(z).clamp(0.0, 1.0 - 1e-12)


def sample_sigmas(n: int, config: PretrainConfig, generator: torch.Generator) -> torch.Tensor:
    """``[n]`` float32 training noise levels: shifted logit-normal (formula in the module docstring)."""
    s = torch.sigmoid(config.logit_mean + config.logit_std * torch.randn(n, generator=generator))
    return config.shift * s / (1 + (config.shift - 1) * s)


def evaluate(
    transformer, text_encoder, steps: int = 20, shift: float = 3.0, repeats: int = 1, seed: int = 1234
) -> Dict[str, float]:
    """Mean toy rewards and attribute accuracies of ODE samples for every prompt (``repeats`` each)."""

    prompts = world.all_prompts() * repeats
    was_training = transformer.training, text_encoder.training
    transformer.eval(), text_encoder.eval()
    video = world.latents_to_video(sample_ode(transformer, text_encoder, prompts, steps, shift, seed))
    transformer.train(was_training[0]), text_encoder.train(was_training[1])
    out = {f"reward/{k}": float(v.mean()) for k, v in toy_rewards(video, prompts).items()}
    out.update({f"accuracy/{k}": float(v.mean()) for k, v in attribute_accuracy(video, prompts).items()})
    return out


def pretrain(
    config: PretrainConfig, output: Optional[Path] = None, progress: bool = True, command: Optional[str] = None
) -> Dict[str, object]:
    """Train the toy model by flow matching; save it to ``output`` (if given) and return the record.

    The record (also written to ``output/pretrain.json``) holds the config, the ``command`` that ran
    it, the loss every 10 steps (mean over those steps), evaluations every ``eval_every`` steps, the
    final loss (mean of the last 10% of steps), the record of the ``init`` model, wall time, process CPU time (all
    threads; on a shared machine the wall time overstates the cost) and parameter counts.
    """
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if config.init is not None:
        transformer, text_encoder = load_toy_model(config.init)
        init_record = Path(config.init) / "pretrain.json"
        init_record = json.loads(init_record.read_text()) if init_record.is_file() else None
    else:
        transformer, text_encoder = build_toy_model(config.transformer_config, config.text_encoder_config, config.seed)
        init_record = None
    transformer.train(), text_encoder.train()
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

    def lr_factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress_ = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress_))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    ema_transformer, ema_text_encoder = copy.deepcopy(transformer).eval(), copy.deepcopy(text_encoder).eval()
    ema_params = list(ema_transformer.parameters()) + list(ema_text_encoder.parameters())
    for p in ema_params:
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(config.seed)
    losses: List[float] = []
    evals: List[Dict[str, float]] = []
    start, start_cpu = time.perf_counter(), time.process_time()
    bar = tqdm(range(config.steps), desc="toy pretrain", disable=not progress)
    for step in bar:
        prompts = world.sample_prompts(config.batch_size, gen)
        if config.caption_coupling:  # the caption first; the rendered values read off the noise
            captions = prompts
            eps = torch.randn(config.batch_size, *CLIP_LATENT_SHAPE, generator=gen)
            prompts = world.noisy_captions(captions, dict(config.caption_accuracy), uniforms=noise_uniforms(eps))
            x0 = world.video_to_latents(world.render(prompts, gen))
        else:
            x0 = world.video_to_latents(world.render(prompts, gen))
            if config.caption_accuracy:
                captions = world.noisy_captions(prompts, dict(config.caption_accuracy), gen)
            else:
                captions = prompts
            eps = torch.randn(x0.shape, generator=gen)
        sigma = sample_sigmas(config.batch_size, config, gen)
        s = sigma.view(-1, 1, 1, 1, 1)
        x_sigma = (1 - s) * x0 + s * eps
        v = predict_velocity(transformer, x_sigma, sigma, text_encoder.encode(captions))
        loss = torch.mean((v - (eps - x0)) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        scheduler.step()
        # Short warm-up of the decay so that early averages are not dominated by the random init.
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, p in zip(ema_params, params):
                ema.lerp_(p, 1 - decay)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", grad=f"{float(grad_norm):.2f}")
        done = step + 1
        if config.eval_every and (done % config.eval_every == 0 or done == config.steps):
            evals.append(
                {
                    "step": done,
                    "seconds": time.perf_counter() - start,
                    **evaluate(ema_transformer, ema_text_encoder, config.eval_sample_steps, config.shift),
                }
            )
            bar.write(f"step {done}: " + ", ".join(f"{k} {v:.3f}" for k, v in evals[-1].items() if "/" in k))
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    tail = max(1, config.steps // 10)
    record = {
        "config": dataclasses.asdict(config),
        "command": command,
        "loss_every_10_steps": [sum(losses[i : i + 10]) / len(losses[i : i + 10]) for i in range(0, len(losses), 10)],
        "first_loss": losses[0],
        "final_loss": sum(losses[-tail:]) / tail,
        "evaluations": evals,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "parameters": {"transformer": count_parameters(transformer), "text_encoder": count_parameters(text_encoder)},
        # The record of the model this run continued (``init``), so the whole recipe stays in one file.
        "init_record": init_record,
    }
    if output is not None:
        output = Path(output)
        save_toy_model(ema_transformer, ema_text_encoder, output)
        (output / "pretrain.json").write_text(json.dumps(record, indent=1))
    record["transformer"], record["text_encoder"] = ema_transformer, ema_text_encoder
    return record
