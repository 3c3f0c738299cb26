"""Rollouts of flow-matching models: noise-level schedules, SDE windows and process-reward guidance.

One sampler covers the RL samplers of the literature as settings (docs/DESIGN.md section 4):

- **Flow-GRPO** (Liu et al. 2025, arXiv:2505.05470): ``schedule="flow_grpo"``, SDE on every step but
  the last, no guidance.
- **Flow-GRPO-Fast** and **MixGRPO** (Li et al. 2025, arXiv:2507.21802): SDE only inside a window of a
  few steps (drawn at random per rollout, or fixed and moved by the trainer), ODE elsewhere; only the
  window's steps carry log-probs and are trained.
- **DanceGRPO** (Xue et al. 2025, arXiv:2505.07818): ``schedule="dance_grpo"`` (constant diffusion
  coefficient ``eta``), SDE on every step, one initial noise per prompt group.
- **Euphonium** (Zhong et al. 2026, arXiv:2602.04928): the DanceGRPO SDE with the gradient of a
  process reward model (PRM) added to the drift at the late steps: ``mean_g = mean + c * grad r_p``.

The per-step arithmetic is ``euphonium.ops.sde_step`` (one fused kernel on CUDA); this module decides
which step is SDE or ODE, where the PRM guides and with which coefficient, draws the noise, and records
what training needs (:class:`Trajectory`). Models enter only through
``velocity_fn(x, sigma, cond) -> v`` (see :mod:`euphonium.models.diffusers` for diffusers transformers).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from euphonium import ops
from euphonium._checks import check_bool, check_choice, check_int, check_positive
from euphonium.ops.sde import LOGPROB_MEANS, SCHEDULES
from euphonium.presets import SAMPLER_PRESETS
from euphonium.schedules import (
    GUIDANCE_FORMS,
    diffusion_coefficient,
    guidance_coefficient,
    noise_std,
    per_sample_norm,
    rho_coefficient,
    shifted_sigmas,
)

STEP_NOISE = ("auto", "kernel", "generator")

VelocityFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------


def _range(name: str, value: Any, num_steps: int) -> Tuple[int, int]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a pair of integers (start, end), got {value!r}")
    start, end = check_int(f"{name}[0] (start)", value[0]), check_int(f"{name}[1] (end)", value[1])
    if not 0 <= start < end <= num_steps:
        raise ValueError(f"{name} must satisfy 0 <= start < end <= num_steps ({num_steps}), got {value!r}")
    return start, end


@dataclass(frozen=True)
class SamplerConfig:
    """Settings of :func:`rollout` (every field is validated; errors name the field).

    Steps are numbered ``0 .. num_steps - 1``; step ``i`` goes from ``sigmas[i]`` to ``sigmas[i + 1]``.
    Ranges are half-open ``(start, end)``.

    Schedule:
        num_steps: number of denoising steps ``N``.
        shift: time shift of :func:`shifted_sigmas`.
        schedule: SDE of the stochastic steps: ``flow_grpo``, ``dance_grpo``, ``cps`` or ``ode``
            (``ode``: every step deterministic, nothing recorded).
        noise_level: ``a`` of ``flow_grpo``/``cps``, ``eta`` of ``dance_grpo``.

    SDE window (steps outside it are deterministic Euler steps with no log-prob):
        sde_window: fixed ``(start, end)`` range of SDE steps (MixGRPO-style: the trainer can move it).
        sde_window_size: draw a window of this many steps per rollout (Flow-GRPO-Fast), its start
            uniform in ``sde_window_range`` (default ``(0, num_steps)``) so that it fits inside.
        Neither: every step is an SDE step.

    Process-reward guidance (Euphonium):
        guidance: add ``c * grad_x r_p(x_i, sigma_i, prompt)`` to the mean of the guided steps; needs
            a PRM at :func:`rollout`. Guided steps are ``range(guidance_start, guidance_end,
            guidance_interval)`` (``guidance_end=None``: to the last step) intersected with the SDE
            steps: a deterministic step has no log-prob to credit the guidance to.
        guidance_form: ``lambda`` (``c = guidance_lambda * delta``), ``kl``
            (``c = s^2 / (2 * guidance_beta) * delta``; see :func:`guidance_coefficient`) or ``rho``
            (``c_b = guidance_rho * std / ||g_b||`` per sample, :func:`rho_coefficient`: a shift of
            norm ``rho`` noise stds, whatever the PRM's gradient scale).
        guidance_rho: ``rho`` of the ``rho`` form.
        grad_normalize: give each sample's PRM gradient unit L2 norm first.
        grad_max_norm: clip each sample's PRM gradient to this L2 norm first.
        logprob_mean: record log-probs under the ``unguided`` policy mean (default: GRPO then distils
            the guidance into the network) or the ``guided`` mean actually sampled from.

    Noise:
        same_initial_noise: one initial noise per prompt group (contiguous blocks of ``group_size``
            samples, given to :func:`rollout`) instead of one per sample.
        step_noise: ``kernel``: the SDE noise is drawn inside ``ops.sde_step`` from a per-step seed that
            the rollout's generator draws (no noise tensor in memory); ``generator``: drawn with
            ``torch.randn(..., generator=...)`` like a diffusers pipeline and passed to the op;
            ``auto`` (default): ``kernel`` for a CUDA rollout, ``generator`` elsewhere (Philox in
            PyTorch integer ops costs about 10x ``torch.randn`` on a CPU). Either way the seed fixes
            the rollout; the two draw different noise, so a CPU and a CUDA rollout of one seed differ.
    """

    num_steps: int = 16
    shift: float = 1.0
    schedule: str = "dance_grpo"
    noise_level: float = 0.3
    sde_window: Optional[Tuple[int, int]] = None
    sde_window_size: Optional[int] = None
    sde_window_range: Optional[Tuple[int, int]] = None
    guidance: bool = False
    guidance_start: int = 12
    guidance_end: Optional[int] = None
    guidance_interval: int = 1
    guidance_form: str = "lambda"
    guidance_lambda: float = 0.01
    guidance_beta: Optional[float] = None
    guidance_rho: float = 0.5
    grad_normalize: bool = False
    grad_max_norm: Optional[float] = None
    logprob_mean: str = "unguided"
    same_initial_noise: bool = False
    step_noise: str = "auto"

    def __post_init__(self) -> None:
        n = check_int("SamplerConfig.num_steps", self.num_steps, minimum=1)
        check_positive("SamplerConfig.shift", self.shift)
        check_choice("SamplerConfig.schedule", self.schedule, SCHEDULES)
        if self.schedule != "ode":
            check_positive("SamplerConfig.noise_level", self.noise_level)
        if self.schedule == "cps" and not self.noise_level <= 1:
            raise ValueError(
                "SamplerConfig.noise_level must be in (0, 1] for schedule 'cps' (std = sigma_next * sin(a * pi "
                f"/ 2)), got {self.noise_level}"
            )
        if self.schedule == "flow_grpo" and n < 2:
            raise ValueError(
                "SamplerConfig.num_steps must be >= 2 with schedule 'flow_grpo': its coefficient at sigma = 1 "
                "uses the next noise level sigma_1 < 1"
            )
        for name in ("guidance", "grad_normalize", "same_initial_noise"):
            check_bool(f"SamplerConfig.{name}", getattr(self, name))
        check_choice("SamplerConfig.logprob_mean", self.logprob_mean, LOGPROB_MEANS)
        check_choice("SamplerConfig.step_noise", self.step_noise, STEP_NOISE)

        if self.sde_window is not None:
            object.__setattr__(self, "sde_window", _range("SamplerConfig.sde_window", self.sde_window, n))
            if self.sde_window_size is not None:
                raise ValueError(
                    "SamplerConfig.sde_window and SamplerConfig.sde_window_size are exclusive: give a fixed "
                    "window or a random window's size"
                )
        if self.sde_window_range is not None:
            if self.sde_window_size is None:
                raise ValueError(
                    "SamplerConfig.sde_window_range only applies with SamplerConfig.sde_window_size (a random window)"
                )
            object.__setattr__(
                self, "sde_window_range", _range("SamplerConfig.sde_window_range", self.sde_window_range, n)
            )
        if self.sde_window_size is not None:
            size = check_int("SamplerConfig.sde_window_size", self.sde_window_size, minimum=1)
            lo, hi = self.sde_window_range or (0, n)
            if size > hi - lo:
                raise ValueError(f"SamplerConfig.sde_window_size ({size}) must fit in sde_window_range ({lo}, {hi})")
        if self.schedule == "ode" and (self.sde_window is not None or self.sde_window_size is not None):
            raise ValueError("SamplerConfig.sde_window / sde_window_size need a stochastic schedule; schedule is 'ode'")
        if self.schedule == "cps" and self._last_possible_sde_step() == n - 1:
            raise ValueError(
                "SamplerConfig.sde_window (or sde_window_range) must end before the last step with schedule 'cps': "
                "its std sigma_next * sin(a * pi / 2) is 0 at sigma_next = 0, where the log-prob is undefined"
            )

        check_int("SamplerConfig.guidance_start", self.guidance_start, minimum=0)
        check_int("SamplerConfig.guidance_interval", self.guidance_interval, minimum=1)
        check_int("SamplerConfig.guidance_end", self.guidance_end, minimum=0, allow_none=True)
        check_choice("SamplerConfig.guidance_form", self.guidance_form, GUIDANCE_FORMS)
        check_positive("SamplerConfig.guidance_lambda", self.guidance_lambda, allow_zero=True)
        check_positive("SamplerConfig.guidance_beta", self.guidance_beta, allow_none=True)
        check_positive("SamplerConfig.guidance_rho", self.guidance_rho, allow_zero=True)
        check_positive("SamplerConfig.grad_max_norm", self.grad_max_norm, allow_none=True)
        if self.guidance:
            if self.schedule == "ode":
                raise ValueError("SamplerConfig.guidance needs SDE steps to guide; schedule is 'ode'")
            end = n if self.guidance_end is None else self.guidance_end
            if not self.guidance_start < min(end, n):
                raise ValueError(
                    f"SamplerConfig.guidance_start ({self.guidance_start}) must be below guidance_end "
                    f"({self.guidance_end}) and num_steps ({n}): no step would be guided"
                )
            if self.guidance_form == "kl":
                if self.guidance_beta is None:
                    raise ValueError(
                        "SamplerConfig.guidance_beta is required with guidance_form='kl' (c = s^2 / (2 beta) * delta)"
                    )
                if self.schedule == "cps":
                    raise ValueError(
                        "SamplerConfig.guidance_form='kl' needs a diffusion coefficient s, which schedule "
                        "'cps' does not define; use guidance_form='lambda'"
                    )
            if self.sde_window is not None and not set(self.guidance_steps()) & set(range(*self.sde_window)):
                raise ValueError(
                    f"SamplerConfig.guidance_start/guidance_end select steps {self.guidance_steps()} but the fixed "
                    f"sde_window {self.sde_window} holds none of them: guidance applies only at SDE steps"
                )

    def _last_possible_sde_step(self) -> int:
        if self.sde_window is not None:
            return self.sde_window[1] - 1
        if self.sde_window_size is not None:
            return (self.sde_window_range or (0, self.num_steps))[1] - 1
        return self.num_steps - 1

    def guidance_steps(self) -> List[int]:
        """Steps in the guidance range (before intersecting with the SDE window); empty without guidance."""
        if not self.guidance:
            return []
        end = self.num_steps if self.guidance_end is None else min(self.guidance_end, self.num_steps)
        return list(range(self.guidance_start, end, self.guidance_interval))

    def step_noise_source(self, device: Union[str, torch.device]) -> str:
        """``"kernel"`` or ``"generator"``: where a rollout on ``device`` draws its SDE noise (``step_noise``)."""
        if self.step_noise != "auto":
            return self.step_noise
        return "kernel" if torch.device(device).type == "cuda" else "generator"

    def draw_sde_window(self, generator: Optional[torch.Generator] = None) -> Tuple[int, int]:
        """The ``(start, end)`` SDE steps of one rollout; a random window draws its start from ``generator``."""
        if self.schedule == "ode":
            return (0, 0)
        if self.sde_window is not None:
            return self.sde_window
        if self.sde_window_size is not None:
            lo, hi = self.sde_window_range or (0, self.num_steps)
            device = generator.device if generator is not None else "cpu"
            start = int(
                torch.randint(lo, hi - self.sde_window_size + 1, (1,), generator=generator, device=device).item()
            )
            return (start, start + self.sde_window_size)
        return (0, self.num_steps)

    def replace(self, **changes: Any) -> "SamplerConfig":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


# The published defaults (euphonium/presets.py). Windows that depend on num_steps are filled in by
# ``preset`` after the caller's overrides.
PRESETS = tuple(SAMPLER_PRESETS)


def preset(name: str, **overrides: Any) -> SamplerConfig:
    """The published sampler settings of ``name``, with ``overrides`` applied (any SamplerConfig field).

    - ``flow_grpo`` (Flow-GRPO, github.com/yifan123/flow_grpo): ``schedule="flow_grpo"``,
      ``noise_level=0.7`` (``config/base.py``), 20 steps (``config/grpo.py:general_ocr_wan2_1``, which
      also sets CFG 4.5: the adapter's ``cfg_scale``), SDE on steps ``(0, N - 1)`` with the last step
      deterministic (the pipelines' ``sde_window = (0, len(timesteps) - 1)``), independent initial noise
      (``same_latent=False``); ``shift=3.0`` is diffusers' Wan2.1 480p flow shift (``WanPipeline`` docs).
    - ``flow_grpo_fast`` (Flow-GRPO-Fast as the same repo recommends it, ``config/grpo.py:
      pickscore_sd3_fast_nocfg``): 10 steps, ``schedule="cps"``, ``noise_level=0.8``, a random window
      of 3 SDE steps per rollout inside ``(0, N // 2)``, no CFG.
    - ``dance_grpo`` (DanceGRPO, ``scripts/finetune/finetune_flux_grpo.sh``): ``schedule="dance_grpo"``,
      ``eta=0.3``, 16 steps, ``shift=3``, one initial noise per prompt group (``--init_same_noise``), SDE
      on every step, no CFG.
    - ``euphonium`` (Euphonium, github.com/zerzerzerz/Euphonium ``scripts/train_grpo_hunyuan.sh``): the
      DanceGRPO SDE with ``eta=0.25``, 16 steps, ``shift=5``, same noise per group, PRM guidance on
      steps 12-15 with ``c = 0.01 * delta`` (``PROCESS_LATENT_REWARD_GUIDANCE_SCALE=0.01``,
      ``START_STEP=12``, ``USE_DELTA_T_FOR_GRADIENT_SCALING=true``), raw gradient, log-probs under the
      unguided mean (``USE_REWARD_GUIDED_MEAN_FOR_LOGPROB=false``), no CFG. Upstream's gradient
      normalisation (off by default) divides by the norm of the whole batch; ours is per sample.
    - ``dance_grpo_eu`` (ours, a baseline): ``euphonium``'s sampler without guidance, so that
      ``euphonium`` and ``dance_grpo_eu`` differ only by the method's additions.
    - ``grpo_fast``, ``td_fast`` (ours): ``flow_grpo_fast``'s 10 steps, ``cps`` with ``a = 0.8`` and a
      random 3-step SDE window inside ``(0, N // 2)``, with one initial noise per prompt group (a group
      then differs only by the window's noise, which GRPO credits to the window's steps). The two differ
      in the trainer's objective only (``euphonium/presets.py``: TD process credit for ``td_fast``).
    - ``euphonium_fast`` (ours): ``td_fast``'s sampler with PRM guidance on every SDE step in the
      ``rho`` form (``guidance_rho=0.5``: each guided shift is half a noise std) and log-probs under
      the guided mean, the density actually sampled.
    """
    if name not in SAMPLER_PRESETS:
        raise ValueError(f"preset name must be one of {PRESETS}, got {name!r}")
    fields = {f.name for f in dataclasses.fields(SamplerConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown SamplerConfig field(s) {unknown}; fields are {sorted(fields)}")
    settings = {**SAMPLER_PRESETS[name], **overrides}
    n = settings["num_steps"]
    if (
        name == "flow_grpo"
        and "sde_window" not in overrides
        and "sde_window_size" not in overrides
        and isinstance(n, int)
        and n > 1
    ):
        settings["sde_window"] = (0, n - 1)
    if (
        SAMPLER_PRESETS[name].get("sde_window_size")
        and "sde_window_range" not in overrides
        and "sde_window" not in overrides
        and isinstance(n, int)
    ):
        settings["sde_window_range"] = (0, max(n // 2, settings.get("sde_window_size") or 1))
    return SamplerConfig(**settings)


# ----------------------------------------------------------------------------------------------------
# Trajectory
# ----------------------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """What one rollout of ``B`` samples leaves for training; ``K`` = number of SDE steps recorded.

    Attributes:
        latents: ``[B, K + 1, ...]`` in the rollout dtype: ``latents[:, j]`` is the latent before the
            ``j``-th SDE step and ``latents[:, j + 1]`` the one after it (the SDE steps are contiguous,
            so ``K + 1`` latents hold all ``K`` transitions). Empty (``K = 0``) without SDE steps.
        log_prob: ``[B, K]`` float32 log-density of each recorded transition (docs/DESIGN.md section 4.2).
        process_reward: ``[B, K]`` float32 PRM reward ``r_p(x_i, sigma_i, prompt)`` of each recorded step's
            input at guided steps (and, with ``rollout(score_states=True)``, at every recorded step), 0
            elsewhere.
        guided: ``[K]`` bool, which recorded steps were guided.
        guidance_grad: ``[B, G, ...]`` the PRM gradient ``g`` each of the ``G`` guided steps used (in the
            order of ``guided``, in the dtype ``ops.sde_step`` received it), or None when no step was
            guided; with ``guidance_scale`` (``[B, G]`` float32 ``c``) what the guided-mean log-prob
            (``ops.sde_log_prob(..., reward_grad=g, guidance_scale=c)``: the rollout's bits) and an
            explicit distillation loss need. :attr:`guidance_shift` is ``c * g``.
        guidance_grad_norm: ``[B, G]`` float32 ``||g||`` of the gradient each guided step used (after
            ``grad_normalize``/``grad_max_norm``), or None.
        guidance_rho: ``[B, G]`` float32 effective ``rho = c ||g|| / std`` of each guided step (the shift
            in noise stds, whatever the guidance form), or None.
        sde_steps: ``[K]`` int64, the step index (``0 .. N - 1``) of each recorded column.
        is_sde: ``[N]`` bool, which of the ``N`` steps were SDE steps (the others were ODE steps).
        sigmas: ``[N + 1]`` float32 schedule.
        x0: ``[B, ...]`` rollout dtype: the last step's ``x0_pred = x - sigma * v`` (what DanceGRPO and
            Euphonium decode; equal to ``final_latent`` when the last step is an ODE step).
        final_latent: ``[B, ...]`` rollout dtype: the latent after the last step (what Flow-GRPO decodes).
        schedule, noise_level, sigma_max, logprob_mean: the SDE the log-probs were computed under.
    """

    latents: torch.Tensor
    log_prob: torch.Tensor
    process_reward: torch.Tensor
    guided: torch.Tensor
    guidance_grad: Optional[torch.Tensor]
    guidance_scale: Optional[torch.Tensor]
    guidance_grad_norm: Optional[torch.Tensor]
    guidance_rho: Optional[torch.Tensor]
    sde_steps: torch.Tensor
    is_sde: torch.Tensor
    sigmas: torch.Tensor
    x0: torch.Tensor
    final_latent: torch.Tensor
    schedule: str
    noise_level: float
    sigma_max: Optional[float]
    logprob_mean: str

    @property
    def num_sde_steps(self) -> int:
        return int(self.sde_steps.numel())

    @property
    def guidance_shift(self) -> Optional[torch.Tensor]:
        """``[B, G, ...]`` float32 ``c * g`` added to the mean of each guided step, or None."""
        if self.guidance_grad is None:
            return None
        scale = self.guidance_scale.view(*self.guidance_scale.shape, *([1] * (self.guidance_grad.dim() - 2)))
        return scale * self.guidance_grad.float()

    @property
    def trainable(self) -> torch.Tensor:
        """``[K]`` bool: recorded steps whose output reaches the decoded sample. The decoded sample is the
        last step's ``x0_pred``, a function of that step's input, so the last step's own noise and
        guidance never reach the reward: it is never trained."""
        return self.sde_steps < self.is_sde.numel() - 1

    @property
    def x(self) -> torch.Tensor:
        """``[B, K, ...]`` latents before each recorded SDE step (a view)."""
        return self.latents[:, :-1]

    @property
    def x_next(self) -> torch.Tensor:
        """``[B, K, ...]`` latents after each recorded SDE step (a view)."""
        return self.latents[:, 1:]

    @property
    def sigma(self) -> torch.Tensor:
        """``[K]`` float32 noise level before each recorded step."""
        return self.sigmas[self.sde_steps]

    @property
    def sigma_next(self) -> torch.Tensor:
        """``[K]`` float32 noise level after each recorded step."""
        return self.sigmas[self.sde_steps + 1]

    def step_args(self, j: int) -> Tuple[float, float, dict]:
        """``(sigma, sigma_next, kwargs)`` of recorded step ``j`` for ``ops.sde_log_prob``/``ops.sde_step``."""
        i = int(self.sde_steps[j])
        kwargs = dict(schedule=self.schedule, noise_level=self.noise_level, sigma_max=self.sigma_max)
        return float(self.sigmas[i]), float(self.sigmas[i + 1]), kwargs

    def recompute_log_prob(self, j: int, v: torch.Tensor, *, v_ref: Optional[torch.Tensor] = None):
        """Training log-prob of recorded step ``j`` under velocity ``v`` ``[B, ...]``: ``ops.sde_log_prob``.

        Differentiable in ``v``. With the rollout's own ``v`` this is bit for bit the recorded
        ``log_prob[:, j]``, under either mean: with ``logprob_mean="guided"`` a guided step's density
        ``N(x_next; mean + c g, std)`` gets the step's own ``g`` and ``c`` (:meth:`guidance_at`).
        Returns ``[B]`` float32, or ``(log_prob, kl)`` when ``v_ref`` is given.
        """
        sigma, sigma_next, kwargs = self.step_args(j)
        x_next = self.latents[:, j + 1]
        rows = torch.arange(x_next.shape[0], device=x_next.device)
        guidance = self.guidance_at(rows, torch.full_like(rows, j)) if self.logprob_mean == "guided" else {}
        return ops.sde_log_prob(self.latents[:, j], v, x_next, sigma, sigma_next, v_ref=v_ref, **kwargs, **guidance)

    def guidance_at(self, rows: torch.Tensor, cols: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``{"reward_grad": g, "guidance_scale": c}`` of sample ``rows[i]`` at recorded step ``cols[i]``
        (``c = 0`` where that step was not guided), the keyword arguments that give ``ops.sde_log_prob``
        the step's guided mean; empty when no step was guided."""
        if self.guidance_grad is None:
            return {}
        # Column of each recorded step among the guided ones (guidance_grad holds only those).
        g_index = (torch.cumsum(self.guided.long(), 0) - 1).clamp_min(0)[cols]
        scale = self.guidance_scale[rows, g_index] * self.guided[cols]
        return {"reward_grad": self.guidance_grad[rows, g_index], "guidance_scale": scale}

    def shift_at(self, rows: torch.Tensor, cols: torch.Tensor) -> Optional[torch.Tensor]:
        """The guidance shift ``c * g`` of sample ``rows[i]`` at recorded step ``cols[i]``: ``[n, ...]``
        float32, zero where that step was not guided; None when no step was guided."""
        guidance = self.guidance_at(rows, cols)
        if not guidance:
            return None
        c = guidance["guidance_scale"].view(-1, *([1] * (guidance["reward_grad"].dim() - 1)))
        return c * guidance["reward_grad"].float()

    def select(self, index: Union[torch.Tensor, Sequence[int], slice]) -> "Trajectory":
        """The trajectory of a subset of the samples (``index`` into the batch dimension)."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long, device=self.latents.device)
        return dataclasses.replace(
            self,
            latents=self.latents[index],
            log_prob=self.log_prob[index],
            process_reward=self.process_reward[index],
            guidance_grad=None if self.guidance_grad is None else self.guidance_grad[index],
            guidance_scale=None if self.guidance_scale is None else self.guidance_scale[index],
            guidance_grad_norm=None if self.guidance_grad_norm is None else self.guidance_grad_norm[index],
            guidance_rho=None if self.guidance_rho is None else self.guidance_rho[index],
            x0=self.x0[index],
            final_latent=self.final_latent[index],
        )


# ----------------------------------------------------------------------------------------------------
# Rollout
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def ode_steps(velocity_fn: VelocityFn, cond: Any, x: torch.Tensor, sigmas: Sequence[float], *, start: int = 0):
    """Deterministic Euler steps ``start .. N - 1`` over the schedule ``sigmas`` (``N + 1`` floats):
    ``x <- x - (sigma - sigma_next) v(x, sigma)`` through ``ops.sde_step(schedule="ode")``, as
    :func:`rollout` takes its ODE steps. Returns the final latent in ``x``'s dtype."""
    batch = x.shape[0]
    for i in range(start, len(sigmas) - 1):
        v = velocity_fn(x, torch.full((batch,), sigmas[i], dtype=torch.float32, device=x.device), cond)
        x = ops.sde_step(x, v, sigmas[i], sigmas[i + 1], schedule="ode", noise_level=0.0).x_next
    return x


def _make_generator(seed: Union[int, torch.Generator, None], device: torch.device) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, a torch.Generator or None, got {type(seed).__name__}")
    else:
        generator.manual_seed(seed)
    return generator


def _randn(shape: Sequence[int], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    # Drawn on the generator's device (a CPU generator gives the same noise for a CUDA rollout).
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32).to(device)


def _initial_noise(shape, noise, dtype, device, generator, same, group_size) -> torch.Tensor:
    if noise is not None:
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
            raise TypeError(
                "noise must be a floating-point tensor, got "
                f"{type(noise).__name__ if not isinstance(noise, torch.Tensor) else noise.dtype}"
            )
        if noise.dim() < 2 or noise.shape[0] == 0:
            raise ValueError(f"noise must be [B, ...] with a non-empty batch, got shape {tuple(noise.shape)}")
        return noise.to(device=device, dtype=dtype)
    if shape is None:
        raise ValueError("rollout needs the latent shape [B, ...] (shape=) or the initial noise (noise=)")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or shape[0] < 1 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be [B, ...] with positive sizes and at least 2 dimensions, got {shape}")
    if not same:
        return _randn(shape, generator, device).to(dtype)
    if group_size is None:
        raise ValueError(
            "group_size is required with SamplerConfig.same_initial_noise (samples of one prompt group share the noise)"
        )
    group_size = check_int("group_size", group_size, minimum=1)
    if shape[0] % group_size:
        raise ValueError(
            f"group_size ({group_size}) must divide the batch size ({shape[0]}) to share noise within prompt groups"
        )
    per_group = _randn((shape[0] // group_size, *shape[1:]), generator, device)
    return per_group.repeat_interleave(group_size, dim=0).to(dtype)


def _prm_condition(prm: Any, cond: Any) -> Any:
    # A PRM that reads the family's whole Conditioning gets it (the backbone PRM: pooled projections, guidance,
    # masks); others the text embeddings a diffusers Conditioning carries.
    return cond if getattr(prm, "reads_conditioning", False) else getattr(cond, "prompt_embeds", cond)


@torch.no_grad()
def rollout(
    velocity_fn: VelocityFn,
    cond: Any,
    config: SamplerConfig,
    *,
    shape: Optional[Sequence[int]] = None,
    noise: Optional[torch.Tensor] = None,
    prm: Optional[Callable[..., torch.Tensor]] = None,
    prm_cond: Any = None,
    group_size: Optional[int] = None,
    seed: Union[int, torch.Generator, None] = None,
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
    score_states: bool = False,
    progress: bool = False,
) -> Trajectory:
    """Sample ``B`` latents from pure noise in ``config.num_steps`` steps and record the trajectory.

    Step ``i`` (``sigma = sigmas[i]``, ``sigma_next = sigmas[i + 1]``, :func:`shifted_sigmas`):
    ``v = velocity_fn(x, sigma * ones(B), cond)``; inside the SDE window
    ``x = ops.sde_step(x, v, sigma, sigma_next, schedule, noise_level, ...)`` (recording ``x``, the new
    ``x`` and the log-prob); at guided steps first ``r, g = ops.reward_grad(prm, x, sigma * ones(B),
    prm_cond)`` and the step's mean moves by ``c * g`` (:func:`guidance_coefficient`); outside the
    window a deterministic Euler step ``x - delta * v``.

    Args:
        velocity_fn: ``(x [B, ...], sigma [B] float32, cond) -> v`` of the shape of ``x`` (any dtype).
            An adapter with a ``dtype`` attribute (the model's) sets the default rollout dtype.
        cond: passed through to ``velocity_fn`` (e.g. :class:`euphonium.models.diffusers.Conditioning`).
        config: a :class:`SamplerConfig` (see :func:`preset`).
        shape: latent shape ``[B, ...]`` of the initial noise to draw; or
        noise: the initial latents ``[B, ...]`` themselves (``x`` at ``sigma = 1``).
        prm: process reward model, called ``prm(x, sigma [B], prm_cond) -> [B]``; required with
            ``config.guidance`` or ``score_states``.
        prm_cond: the PRM's conditioning; default ``cond`` for a PRM with ``reads_conditioning``, else
            ``cond.prompt_embeds`` if ``cond`` has it, else ``cond``.
        group_size: prompt-group size (contiguous samples) for ``config.same_initial_noise``.
        seed: int or ``torch.Generator`` (None: a fresh random seed). The generator draws, in order:
            the initial noise, the random window's start, then per SDE step either a Philox seed for
            the in-kernel noise or the noise itself (``config.step_noise``). Same seed, same rollout.
        dtype: dtype the latents are kept and stored in (default ``velocity_fn.dtype`` if it has one,
            else float32). The stored latents are exactly those the log-probs were computed at.
        device: device of the latents (default: of ``noise``, else ``velocity_fn.device`` if it has
            one, else CPU).
        score_states: also score the input of every recorded unguided step with ``prm`` (no gradient),
            into ``process_reward``: the states a TD process advantage compares.
        progress: show a tqdm progress bar.

    Returns:
        :class:`Trajectory`.
    """
    if not isinstance(config, SamplerConfig):
        raise TypeError(f"config must be a SamplerConfig, got {type(config).__name__}")
    if not callable(velocity_fn):
        raise TypeError(f"velocity_fn must be callable (x, sigma, cond) -> v, got {type(velocity_fn).__name__}")
    if config.guidance and prm is None:
        raise ValueError(
            "prm is required: SamplerConfig.guidance is on (pass the process reward model, or guidance=False)"
        )
    if score_states and prm is None:
        raise ValueError("prm is required: score_states=True scores the recorded states with it")
    if not config.guidance and not score_states and prm is not None:
        raise ValueError(
            "prm was given but SamplerConfig.guidance is off and score_states is False; set either to use it"
        )
    if dtype is None:
        dtype = getattr(velocity_fn, "dtype", None) or torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    if device is None:
        device = (
            noise.device
            if isinstance(noise, torch.Tensor)
            else getattr(velocity_fn, "device", None) or torch.device("cpu")
        )
    device = torch.device(device)
    if shape is not None and noise is not None:
        raise ValueError("give either shape (noise is drawn) or noise (the initial latents), not both")

    generator = _make_generator(seed, device)
    noise_source = config.step_noise_source(device)
    x = _initial_noise(shape, noise, dtype, device, generator, config.same_initial_noise, group_size)
    batch = x.shape[0]
    if prm is not None and prm_cond is None:
        prm_cond = _prm_condition(prm, cond)

    n = config.num_steps
    sigmas = shifted_sigmas(n, config.shift, device=device)
    sigma_values = sigmas.tolist()
    start, end = config.draw_sde_window(generator)
    num_sde = end - start
    is_sde = torch.zeros(n, dtype=torch.bool, device=device)
    is_sde[start:end] = True
    guided_steps = set(config.guidance_steps()) & set(range(start, end))
    # Flow-GRPO's SDE divides by 1 - sigma at sigma = 1 and uses the next grid point there.
    sigma_max = sigma_values[1] if config.schedule == "flow_grpo" else None
    sde_kwargs = dict(schedule=config.schedule, noise_level=config.noise_level, sigma_max=sigma_max)

    latents = (
        torch.empty((batch, num_sde + 1, *x.shape[1:]), dtype=dtype, device=device)
        if num_sde
        else x.new_empty((batch, 0, *x.shape[1:]))
    )
    log_prob = torch.zeros((batch, num_sde), dtype=torch.float32, device=device)
    process_reward = torch.zeros((batch, num_sde), dtype=torch.float32, device=device)
    guided = torch.zeros(num_sde, dtype=torch.bool, device=device)
    grads: List[torch.Tensor] = []
    scales: List[torch.Tensor] = []
    grad_norms: List[torch.Tensor] = []
    rhos: List[torch.Tensor] = []

    x0 = x
    for i in tqdm(range(n), desc="rollout", disable=not progress, leave=False):
        sigma, sigma_next = sigma_values[i], sigma_values[i + 1]
        v = velocity_fn(x, torch.full((batch,), sigma, dtype=torch.float32, device=device), cond)
        if not isinstance(v, torch.Tensor) or v.shape != x.shape:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(
                f"velocity_fn must return a tensor of the latent shape {tuple(x.shape)}, got {got} at step {i}"
            )
        if not start <= i < end:
            out = ops.sde_step(x, v, sigma, sigma_next, schedule="ode", noise_level=0.0)
            x, x0 = out.x_next, out.x0_pred
            continue

        j = i - start
        if j == 0:
            latents[:, 0] = x
        step_noise, step_seed = None, None
        reward_grad, c = None, 0.0
        if score_states and i not in guided_steps:
            with torch.no_grad():
                sigma_b = torch.full((batch,), sigma, dtype=torch.float32, device=device)
                process_reward[:, j] = prm(x, sigma_b, prm_cond).float()
        if i in guided_steps:
            sigma_b = torch.full((batch,), sigma, dtype=torch.float32, device=device)
            reward, reward_grad = ops.reward_grad(
                prm, x, sigma_b, prm_cond, normalize=config.grad_normalize, max_norm=config.grad_max_norm
            )
            grad_norm = per_sample_norm(reward_grad)
            std = noise_std(sigma, sigma_next, **sde_kwargs)
            if config.guidance_form == "rho":
                c = rho_coefficient(grad_norm, config.guidance_rho, std)
            else:
                c = guidance_coefficient(
                    sigma,
                    sigma_next,
                    form=config.guidance_form,
                    lam=config.guidance_lambda,
                    beta=config.guidance_beta,
                    **sde_kwargs,
                )
            process_reward[:, j] = reward.float()
            guided[j] = True
            grads.append(reward_grad)
            scales.append(c if isinstance(c, torch.Tensor) else torch.full((batch,), c, device=device))
            grad_norms.append(grad_norm)
            rhos.append(c * grad_norm / std)  # std > 0: cps never records its zero-noise last step
        if noise_source == "generator":
            step_noise = _randn(x.shape, generator, device)
        else:
            step_seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
        out = ops.sde_step(
            x,
            v,
            sigma,
            sigma_next,
            reward_grad=reward_grad,
            guidance_scale=c,
            noise=step_noise,
            seed=step_seed,
            logprob_mean=config.logprob_mean,
            **sde_kwargs,
        )
        x, x0 = out.x_next, out.x0_pred
        latents[:, j + 1] = x
        log_prob[:, j] = out.log_prob

    return Trajectory(
        latents=latents,
        log_prob=log_prob,
        process_reward=process_reward,
        guided=guided,
        guidance_grad=torch.stack(grads, dim=1) if grads else None,
        guidance_scale=torch.stack(scales, dim=1).float() if grads else None,
        guidance_grad_norm=torch.stack(grad_norms, dim=1) if grads else None,
        guidance_rho=torch.stack(rhos, dim=1) if grads else None,
        sde_steps=torch.arange(start, end, dtype=torch.long, device=device),
        is_sde=is_sde,
        sigmas=sigmas,
        x0=x0,
        final_latent=x,
        schedule=config.schedule,
        noise_level=float(config.noise_level),
        sigma_max=sigma_max,
        logprob_mean=config.logprob_mean,
    )


__all__ = [
    "GUIDANCE_FORMS",
    "LOGPROB_MEANS",
    "PRESETS",
    "SCHEDULES",
    "STEP_NOISE",
    "SamplerConfig",
    "Trajectory",
    "diffusion_coefficient",
    "guidance_coefficient",
    "noise_std",
    "ode_steps",
    "per_sample_norm",
    "rho_coefficient",
    "preset",
    "rollout",
    "shifted_sigmas",
]
