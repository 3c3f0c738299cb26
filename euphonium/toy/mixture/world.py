"""The analytic mixture world: per-prompt Gaussian mixtures, their exact posteriors, rewards and oracle PRM.

Each prompt ``"mixture p"`` (``p = 0 .. P - 1``) owns a mixture of ``K`` modes in ``D`` dimensions, and
each mode ``K`` sub-clusters of ``S`` isotropic Gaussian components (float64 parameters)::

    x0 ~ sum_{k, j} w[p, k, j] N(m[p, k, j], s[p, k, j]^2 I),
    m[p, k, j] = R q[p, k] + delta u[p, k] (j = 0: +, j = 1: -; S > 2: delta u[p, k, j], unit u),

``q[p, :]`` orthonormal (modes ``R sqrt(2)`` apart), ``u[p, k]`` unit directions. The *prompted
component* of every prompt is ``(k, j) = (0, 0)`` (:data:`TARGET`): mode 0 is what the prompt asks for
and its data weight ``sum_j w[p, 0, j]`` is only about 0.2-0.3 (the data are "mis-weighted"); inside
it the prompted sub-cluster has weight about 0.3. Modes are ``R sqrt(2) = 3.5`` apart and decided at
high noise; sub-clusters are ``2 delta = 1`` apart with ``s = 0.1`` and only low noise levels resolve them
(the late "detail" decision), so guidance at early and late steps can be told apart.

Flow matching noises ``x_sigma = (1 - sigma) x0 + sigma eps``, so per component
``x_sigma ~ N((1 - sigma) m, ((1 - sigma)^2 s^2 + sigma^2) I)`` and the posterior of the components
given ``x_sigma`` is closed form (log-sum-exp in float64). The outcome rewards are posteriors at
``sigma = 0``:

- ``mode``: ``P(k = 0 | x0)``; ``component``: ``P(k = 0, j = 0 | x0)``;
- ``combined``: ``(w_mode * mode + w_component * component) / (w_mode + w_component)`` (default 1, 1).

Every reward is a linear combination of component posteriors, and ``x0 -> x_sigma`` is a Markov step,
so ``E[r(x0) | x_sigma] = sum_c a_c P(c | x_sigma)``: :class:`MixtureOraclePRM` is the exact PRM
(under the data distribution, which the base model approximates), analytic and differentiable.

Latents are ``[B, D, 1, 1, 1]`` (the sampler's and the diffusers adapter's ``[B, C, F, H, W]``);
prompts are encoded as fixed orthogonal embeddings ``[B, 1, E]`` (``""``, the unconditional prompt,
as zeros). Videos for the reward interface: :func:`latents_to_video` maps a point to a one-frame RGB
strip ``[B, 1, 3, 1, D / 3]`` of ``sigmoid(x)`` (invertible, so :func:`video_to_latents` gives the
point back and the rewards are exact functions of the decoded "video").
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from euphonium._checks import check_float_tensor
from euphonium.rewards.base import RewardSet

TARGET: Tuple[int, int] = (0, 0)  # (mode, sub-cluster) that every prompt asks for
PROMPT_PREFIX = "mixture"
DEFAULT_REWARD_WEIGHTS: Dict[str, float] = {"mode": 1.0, "component": 1.0}
REWARD_PARTS = ("mode", "component")
# Pixels of the decoded "video" are sigmoid(x): float32 resolves logit(v) to ~1e-6 for |x| < 10.
VIDEO_CLAMP = 1e-12

Generator = Union[torch.Generator, int, None]


@dataclass(frozen=True)
class MixtureWorldConfig:
    """The sizes and scales of a mixture world; everything random is drawn from ``seed``.

    num_prompts: ``P`` prompts ``"mixture 0" .. "mixture P-1"``, each with its own mixture.
    dim: ``D``, the data dimension (a multiple of 3: the decoded video is an RGB strip).
    num_modes: ``K`` modes per prompt (>= 2), ``num_subclusters``: ``S`` sub-clusters per mode (>= 2).
    mode_radius: ``R``, the norm of every mode centre (orthonormal directions: modes ``R sqrt(2)`` apart).
    sub_offset: ``delta``, the distance of each sub-cluster mean from its mode centre.
    component_std: ``s``, the isotropic standard deviation of every component.
    target_mode_weight, target_sub_weight: ranges of the prompted mode's weight and of the prompted
        sub-cluster's weight inside it (uniform per prompt); the other modes share the rest of the
        weight by a Dirichlet(5) draw, the other sub-clusters by uniform weights in [0.3, 0.7].
    embed_dim: ``E``, the width of the prompt embeddings (>= P: they are orthogonal).
    seed: the world's seed.
    """

    num_prompts: int = 16
    dim: int = 24
    num_modes: int = 4
    num_subclusters: int = 2
    mode_radius: float = 2.5
    sub_offset: float = 0.5
    component_std: float = 0.1
    target_mode_weight: Tuple[float, float] = (0.2, 0.3)
    target_sub_weight: Tuple[float, float] = (0.25, 0.35)
    embed_dim: int = 32
    seed: int = 0

    def __post_init__(self):
        for name, minimum in (("num_prompts", 1), ("dim", 3), ("num_modes", 2), ("num_subclusters", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"MixtureWorldConfig.{name} must be an integer >= {minimum}, got {value!r}")
        if self.dim % 3:
            raise ValueError(f"MixtureWorldConfig.dim must be a multiple of 3 (an RGB strip), got {self.dim}")
        if self.num_modes > self.dim:
            raise ValueError(f"MixtureWorldConfig.num_modes ({self.num_modes}) must be <= dim ({self.dim})")
        if self.embed_dim < self.num_prompts:
            raise ValueError(
                f"MixtureWorldConfig.embed_dim ({self.embed_dim}) must be >= num_prompts ({self.num_prompts})"
            )
        for name in ("mode_radius", "sub_offset", "component_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"MixtureWorldConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("target_mode_weight", "target_sub_weight"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi < 1:
                raise ValueError(f"MixtureWorldConfig.{name} must be a range inside (0, 1), got {(lo, hi)}")


class MixtureWorld:
    """The parameters of one mixture world (float64, CPU) and its exact computations.

    Attributes:
        config: the :class:`MixtureWorldConfig`.
        prompts: ``["mixture 0", ...]``.
        means: ``[P, K, S, D]``; stds: ``[P, K, S]``; weights: ``[P, K, S]`` (each prompt's sum to 1).
        embeddings: ``[P, E]`` float32 prompt embeddings (orthogonal rows of norm ``sqrt(E)``).
    """

    def __init__(self, config: Optional[MixtureWorldConfig] = None):
        config = config if config is not None else MixtureWorldConfig()
        if not isinstance(config, MixtureWorldConfig):
            raise TypeError(f"config must be a MixtureWorldConfig, got {type(config).__name__}")
        self.config = config
        c = config
        gen = torch.Generator().manual_seed(c.seed)
        f64 = dict(dtype=torch.float64, generator=gen)
        p, k, s, d = c.num_prompts, c.num_modes, c.num_subclusters, c.dim
        directions = torch.linalg.qr(torch.randn(p, d, k, **f64)).Q.transpose(1, 2)  # [P, K, D] orthonormal
        offsets = torch.randn(p, k, s, d, **f64)
        if s == 2:  # two sub-clusters: symmetric about the mode centre
            offsets[:, :, 1] = -offsets[:, :, 0]
        offsets = offsets / offsets.norm(dim=-1, keepdim=True)
        self.means = c.mode_radius * directions.unsqueeze(2) + c.sub_offset * offsets
        self.stds = torch.full((p, k, s), c.component_std, dtype=torch.float64)

        lo, hi = c.target_mode_weight
        target_mode = lo + (hi - lo) * torch.rand(p, **f64)
        others = torch.distributions.Dirichlet(torch.full((k - 1,), 5.0, dtype=torch.float64))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
            rest = others.sample((p,))
        mode_w = torch.cat([target_mode[:, None], (1 - target_mode[:, None]) * rest], dim=1)  # [P, K]
        sub_w = 0.3 + 0.4 * torch.rand(p, k, s, **f64)
        lo, hi = c.target_sub_weight
        target_sub = lo + (hi - lo) * torch.rand(p, **f64)
        sub_w[:, 0, 1:] = sub_w[:, 0, 1:] / sub_w[:, 0, 1:].sum(-1, keepdim=True) * (1 - target_sub[:, None])
        sub_w[:, 0, 0] = target_sub
        sub_w[:, 1:] = sub_w[:, 1:] / sub_w[:, 1:].sum(-1, keepdim=True)
        self.weights = mode_w.unsqueeze(-1) * sub_w
        self.log_weights = self.weights.log()

        embed = torch.linalg.qr(torch.randn(c.embed_dim, p, **f64)).Q.T  # [P, E] orthonormal rows
        self.embeddings = (embed * math.sqrt(c.embed_dim)).float()
        self.prompts = [f"{PROMPT_PREFIX} {i}" for i in range(p)]

    # -- sizes and prompts ---------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def num_prompts(self) -> int:
        return self.config.num_prompts

    @property
    def latent_shape(self) -> Tuple[int, int, int, int]:
        """``(D, 1, 1, 1)``: one sample's latent, ``[C, F, H, W]``."""
        return (self.config.dim, 1, 1, 1)

    @property
    def video_shape(self) -> Tuple[int, int, int, int]:
        """``(1, 3, 1, D / 3)``: one decoded video, ``[F, C, H, W]``."""
        return (1, 3, 1, self.config.dim // 3)

    def prompt_index(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[B]`` int64 prompt numbers of ``"mixture p"`` strings (``ValueError`` naming a bad one)."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a sequence of strings, got {type(prompts).__name__}")
        out = []
        for prompt in prompts:
            match = re.fullmatch(rf"\s*{PROMPT_PREFIX}\s+(\d+)\s*", prompt) if isinstance(prompt, str) else None
            if match is None or int(match.group(1)) >= self.num_prompts:
                raise ValueError(
                    f"prompt {prompt!r} is not a prompt of this mixture world ('{PROMPT_PREFIX} p', "
                    f"p < {self.num_prompts})"
                )
            out.append(int(match.group(1)))
        return torch.tensor(out, dtype=torch.long)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[B, 1, E]`` float32 prompt embeddings; ``""`` (the unconditional prompt) encodes to zeros."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise TypeError("prompts must be a non-empty sequence of prompt strings")
        out = torch.zeros(len(prompts), 1, self.config.embed_dim)
        named = [i for i, p in enumerate(prompts) if not (isinstance(p, str) and p.strip() == "")]
        if named:
            out[named, 0] = self.embeddings[self.prompt_index([prompts[i] for i in named])]
        return out

    def prompt_index_of_embeds(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """``[B]`` prompt numbers of embeddings ``[B, L, E]`` (mean over ``L``) or ``[B, E]`` from :meth:`encode`."""
        check_float_tensor("prompt_embeds", prompt_embeds, min_dim=2)
        flat = prompt_embeds.detach().float()
        if flat.dim() == 3:
            flat = flat.mean(dim=1)
        if flat.dim() != 2 or flat.shape[1] != self.config.embed_dim:
            raise ValueError(
                f"prompt_embeds must be [B, L, {self.config.embed_dim}] or [B, {self.config.embed_dim}], "
                f"got {tuple(prompt_embeds.shape)}"
            )
        keys = self.embeddings.to(flat.device)
        dist = torch.cdist(flat, keys)
        best, index = dist.min(dim=1)
        bad = (best > 1e-3 * math.sqrt(self.config.embed_dim)).nonzero().flatten()
        if bad.numel():
            raise ValueError(f"prompt_embeds[{int(bad[0])}] is the embedding of none of the world's prompts")
        return index

    # -- data ----------------------------------------------------------------------------------------

    def sample(
        self, prompt_index: torch.Tensor, generator: Generator = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw ``x0`` from each prompt's mixture: ``(x0 [B, D] float64, mode [B], sub [B])``."""
        gen = _generator(generator)
        prompt_index = torch.as_tensor(prompt_index, dtype=torch.long)
        w = self.weights[prompt_index].flatten(1)  # [B, K * S]
        comp = torch.multinomial(w, 1, generator=gen).squeeze(1)
        s = self.config.num_subclusters
        mode, sub = comp // s, comp % s
        mean = self.means[prompt_index, mode, sub]
        std = self.stds[prompt_index, mode, sub].unsqueeze(-1)
        eps = torch.randn(mean.shape, generator=gen, dtype=torch.float64)
        return mean + std * eps, mode, sub

    def log_joint(self, x: torch.Tensor, sigma, prompt_index: torch.Tensor) -> torch.Tensor:
        """``log w_c + log N(x; (1 - sigma) m_c, ((1 - sigma)^2 s_c^2 + sigma^2) I)``: ``[B, K, S]`` float64.

        ``x [B, D]`` (any float dtype, differentiable), ``sigma`` a float or ``[B]`` in [0, 1].
        """
        x = x.to(torch.float64)
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        sigma = sigma.expand(batch) if sigma.dim() == 0 else sigma.reshape(batch)
        a = (1 - sigma).view(-1, 1, 1)
        means = self.means.to(x.device)[prompt_index]  # [B, K, S, D]
        var = a**2 * self.stds.to(x.device)[prompt_index] ** 2 + sigma.view(-1, 1, 1) ** 2  # [B, K, S]
        sq = ((x.view(batch, 1, 1, -1) - a.unsqueeze(-1) * means) ** 2).sum(-1)
        return (
            self.log_weights.to(x.device)[prompt_index] - sq / (2 * var) - 0.5 * self.dim * torch.log(2 * math.pi * var)
        )

    def posterior(self, x: torch.Tensor, sigma, prompt_index: torch.Tensor) -> torch.Tensor:
        """``P(k, j | x_sigma = x)`` under the data distribution: ``[B, K, S]`` float64, differentiable in ``x``."""
        logits = self.log_joint(x, sigma, prompt_index)
        return torch.softmax(logits.flatten(1), dim=1).view_as(logits)

    def rewards_of_posterior(
        self, post: torch.Tensor, weights: Optional[Mapping[str, float]] = None
    ) -> Dict[str, torch.Tensor]:
        """``{"mode", "component", "combined"}`` ``[B]`` float64 from posteriors ``[B, K, S]``."""
        weights = check_reward_weights(weights)
        k, j = TARGET
        parts = {"mode": post[:, k].sum(-1), "component": post[:, k, j]}
        total = sum(weights.values())
        parts["combined"] = sum(w * parts[name] for name, w in weights.items()) / total
        return parts

    def rewards(
        self, x0: torch.Tensor, prompt_index: torch.Tensor, weights: Optional[Mapping[str, float]] = None
    ) -> Dict[str, torch.Tensor]:
        """The outcome rewards of points ``x0 [B, D]`` (posteriors at ``sigma = 0``), ``[B]`` float64 each."""
        return self.rewards_of_posterior(self.posterior(x0, 0.0, prompt_index), weights)

    def base_rates(self, weights: Optional[Mapping[str, float]] = None) -> Dict[str, float]:
        """The data's own mean rewards over the prompts: the prior weights of the prompted mode and component.

        (For data samples ``E[P(c | x0)] = w_c``, so these are also the data's expected rewards.)
        """
        post = self.weights  # the posterior averaged over the data is the prior
        return {k: float(v.mean()) for k, v in self.rewards_of_posterior(post, weights).items()}


@functools.lru_cache(maxsize=8)
def build_mixture_world(seed: int = 0, **overrides) -> MixtureWorld:
    """The mixture world of ``MixtureWorldConfig(seed=seed, **overrides)`` (cached: the same object per arguments)."""
    return MixtureWorld(MixtureWorldConfig(seed=seed, **overrides))


def default_world() -> MixtureWorld:
    """The world of the committed base model: ``build_mixture_world(0)``."""
    return build_mixture_world(0)


def _generator(generator: Generator) -> Optional[torch.Generator]:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")
    return torch.Generator().manual_seed(generator)


def check_reward_weights(weights: Optional[Mapping[str, float]]) -> Dict[str, float]:
    """The ``combined`` reward's weights over :data:`REWARD_PARTS` (default 1 and 1); errors name the key."""
    if weights is None:
        return dict(DEFAULT_REWARD_WEIGHTS)
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a mapping of part -> float, got {type(weights).__name__}")
    unknown = sorted(set(weights) - set(REWARD_PARTS))
    if unknown:
        raise ValueError(f"weights names unknown parts {unknown}; the parts are {list(REWARD_PARTS)}")
    out = {}
    for key, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"weights[{key!r}] must be a finite number >= 0, got {w!r}")
        out[key] = float(w)
    if sum(out.values()) <= 0:
        raise ValueError(f"weights must have a positive sum, got {dict(weights)}")
    return out


# -- latents <-> videos ------------------------------------------------------------------------------


def latents_to_video(x: torch.Tensor) -> torch.Tensor:
    """Latents ``[B, D, 1, 1, 1]`` (or points ``[B, D]``) -> "videos" ``[B, 1, 3, 1, D / 3]`` = ``sigmoid(x)``.

    Float32 unless ``x`` is float64 (kept, for exact round trips). Coordinate ``3 i + c`` is channel
    ``c`` of pixel ``i``.
    """
    check_float_tensor("x", x, min_dim=2)
    batch = x.shape[0]
    points = x.reshape(batch, -1)
    dim = points.shape[1]
    if dim % 3 or (x.dim() != 2 and tuple(x.shape[2:]) != (1,) * (x.dim() - 2)):
        raise ValueError(f"x must be [B, D, 1, 1, 1] or [B, D] with D a multiple of 3, got {tuple(x.shape)}")
    points = points.double() if x.dtype == torch.float64 else points.float()
    return torch.sigmoid(points).view(batch, dim // 3, 3).transpose(1, 2).reshape(batch, 1, 3, 1, dim // 3)


def video_to_latents(video: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`latents_to_video`: points ``[B, D]`` float64 (``logit`` of the clamped pixels)."""
    check_float_tensor("video", video, min_dim=5)
    if video.dim() != 5 or video.shape[1] != 1 or video.shape[2] != 3 or video.shape[3] != 1:
        raise ValueError(f"video must have shape [B, 1, 3, 1, D / 3] (a mixture world's), got {tuple(video.shape)}")
    v = video.double().clamp(VIDEO_CLAMP, 1 - VIDEO_CLAMP)
    batch, width = v.shape[0], v.shape[-1]
    return torch.logit(v).reshape(batch, 3, width).transpose(1, 2).reshape(batch, 3 * width)


# -- rewards -----------------------------------------------------------------------------------------


def mixture_rewards(
    videos: torch.Tensor,
    prompts: Sequence[str],
    weights: Optional[Mapping[str, float]] = None,
    world: Optional[MixtureWorld] = None,
) -> Dict[str, torch.Tensor]:
    """``{"combined", "mode", "component"}`` ``[B]`` float32 for decoded ``videos`` and ``"mixture p"`` prompts."""
    world = world if world is not None else default_world()
    x0 = video_to_latents(videos)
    if x0.shape[1] != world.dim:
        raise ValueError(f"videos hold {x0.shape[1]}-dimensional points, the world's are {world.dim}-dimensional")
    index = world.prompt_index(prompts)
    if len(index) != x0.shape[0]:
        raise ValueError(f"prompts has {len(index)} entries but videos has batch size {x0.shape[0]}")
    parts = world.rewards(x0, index.to(x0.device), weights)
    return {k: parts[k].float() for k in ("combined", *REWARD_PARTS)}


def mixture_reward_fn(weights: Optional[Mapping[str, float]] = None, world_seed: int = 0):
    """``build_reward("mixture", weights=..., world_seed=...)``: :func:`mixture_rewards` as ``fn(videos, prompts)``.

    Returns the parts ``combined``, ``mode`` and ``component`` (weigh ``combined`` 1 and the others 0 to
    train on the combined reward and log the others).
    """
    check_reward_weights(weights)
    world = build_mixture_world(world_seed)

    def mixture(videos, prompts):
        return mixture_rewards(videos, prompts, weights, world)

    return mixture


def mixture_reward_set(weights: Optional[Mapping[str, float]] = None, world_seed: int = 0) -> RewardSet:
    """The mixture rewards as a :class:`~euphonium.rewards.RewardSet` whose ``total`` is ``combined``."""
    return RewardSet(
        {"mixture": mixture_reward_fn(weights, world_seed)},
        weights={"combined": 1.0, **{p: 0.0 for p in REWARD_PARTS}},
    )


class MixtureOraclePRM(torch.nn.Module):
    """The exact process reward of the mixture world: ``prm(x_sigma, sigma, prompt_embeds) -> [B]``.

    ``E[combined(x0) | x_sigma] = sum_c a_c P(c | x_sigma)`` with the closed-form posterior of
    :meth:`MixtureWorld.posterior` (float64 log-sum-exp), differentiable in ``x_sigma``. Exact under
    the data distribution. ``x_sigma [B, D, 1, 1, 1]`` or ``[B, D]``; ``sigma`` a float or ``[B]``;
    ``prompt_embeds`` from the world's :meth:`~MixtureWorld.encode` (``[B, L, E]`` or pooled ``[B, E]``).
    Returns float32 (float64 for float64 ``x_sigma``). ``part`` picks ``combined`` (default), ``mode``
    or ``component``.
    """

    def __init__(
        self,
        world: Optional[MixtureWorld] = None,
        weights: Optional[Mapping[str, float]] = None,
        part: str = "combined",
    ):
        super().__init__()
        self.world = world if world is not None else default_world()
        self.weights = check_reward_weights(weights)
        if part not in ("combined", *REWARD_PARTS):
            raise ValueError(f"part must be 'combined' or one of {list(REWARD_PARTS)}, got {part!r}")
        self.part = part

    def forward(self, x_sigma: torch.Tensor, sigma, prompt_embeds: torch.Tensor) -> torch.Tensor:
        check_float_tensor("x_sigma", x_sigma, min_dim=2)
        batch = x_sigma.shape[0]
        points = x_sigma.reshape(batch, -1)
        if points.shape[1] != self.world.dim:
            raise ValueError(f"x_sigma must hold {self.world.dim} values per sample, got {tuple(x_sigma.shape)}")
        index = self.world.prompt_index_of_embeds(prompt_embeds).to(x_sigma.device)
        if isinstance(sigma, torch.Tensor):
            sigma = sigma.to(x_sigma.device)
        post = self.world.posterior(points, sigma, index)
        out = self.world.rewards_of_posterior(post, self.weights)[self.part]
        return out.to(torch.promote_types(x_sigma.dtype, torch.float32))


__all__ = [
    "DEFAULT_REWARD_WEIGHTS",
    "MixtureOraclePRM",
    "MixtureWorld",
    "MixtureWorldConfig",
    "REWARD_PARTS",
    "TARGET",
    "build_mixture_world",
    "check_reward_weights",
    "default_world",
    "latents_to_video",
    "mixture_reward_fn",
    "mixture_reward_set",
    "mixture_rewards",
    "video_to_latents",
]
