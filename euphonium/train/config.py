"""The trainer's one config object: dataclasses, YAML files and ``key=value`` overrides, all strict.

A misspelled key or a value of the wrong type is an error naming the key, never silently ignored.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from euphonium._checks import check_choice, check_float, check_int
from euphonium.presets import GUIDED_ALGORITHMS, OBJECTIVE_PRESETS, SAMPLER_PRESETS

ALGORITHMS = tuple(SAMPLER_PRESETS)
# What ``device=`` may name (whether this machine has it is checked by :func:`check_device`).
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


# ``model.kind``: the toy world or a local diffusers pipeline folder of one family (train/policy.py).
MODEL_KINDS = ("toy", "mixture", "wan", "sd3", "flux", "hunyuan_video")


class ConfigError(ValueError):
    """A config file, override or value that is not valid (the message names the key)."""


@dataclass
class ModelConfig:
    """What is trained.

    kind: ``toy`` (the built-in toy world; ``path`` None = the committed weights) or a local diffusers
        pipeline folder: ``wan`` (Wan2.1, Wan2.2 A14B with ``transformer_2``), ``sd3`` (SD3/3.5),
        ``flux`` (FLUX.1; images are one-frame videos) or ``hunyuan_video``; see train/policy.py.
    path: the model folder.
    dtype: ``float32``, ``bfloat16`` or ``float16`` for the frozen parts and the rollouts.
    lora_rank: > 0 trains a LoRA adapter (peft) of that rank on ``lora_targets``; 0 trains all weights.
    gradient_checkpointing: recompute transformer blocks in backward (diffusers' switch).
    attention_backend: ``auto`` (flash-attn / xformers when installed, else PyTorch SDPA) or a
        diffusers attention backend name.
    cfg_scale: true classifier-free guidance in rollouts and training (1 = off).
    num_frames, height, width: video size for ``wan`` (pixels; latents follow the VAE's strides).
    max_sequence_length: prompt tokens for the UMT5 text encoder (``wan``).
    expert: which Wan2.2 A14B expert(s) train: ``both``, ``high`` (``transformer``, noise levels at or
        above the pipeline's ``boundary_ratio``) or ``low`` (``transformer_2``); ``both`` for one-expert folders.
    guidance_scale: the embedded guidance input of guidance-distilled transformers (``flux``,
        ``hunyuan_video``), not classifier-free guidance (that is ``cfg_scale``).
    """

    kind: str = "toy"
    path: Optional[str] = None
    dtype: str = "float32"
    lora_rank: int = 0
    lora_alpha: Optional[float] = None
    lora_targets: List[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    gradient_checkpointing: bool = False
    attention_backend: str = "auto"
    cfg_scale: float = 1.0
    num_frames: int = 33
    height: int = 480
    width: int = 832
    max_sequence_length: int = 226
    expert: str = "both"
    guidance_scale: float = 3.5


@dataclass
class TrainConfig:
    """Every setting of a run (see ``configs/toy.yaml`` for the defaults with comments).

    algorithm: a bundle of a sampler preset (:func:`euphonium.sampler.preset` of that name) and the
        objective settings of ``euphonium/presets.py`` (``process_advantage``, ``updates_per_step``),
        which apply unless the config sets them: ``euphonium`` (published: PRM-guided rollouts, state
        process advantages), ``euphonium_fast`` (the project's: rho guidance, guided-mean log-probs, TD
        process credit; the toy default), the ladder below it ``grpo_fast`` (outcome reward only) and
        ``td_fast`` (plus TD process credit), and the baselines ``flow_grpo``, ``flow_grpo_fast``,
        ``dance_grpo`` and ``dance_grpo_eu`` (DanceGRPO's objective on ``euphonium``'s sampler).
    sampler: overrides of the algorithm's :func:`euphonium.sampler.preset` (any ``SamplerConfig`` field).
    prompts: training prompts: a list, or a ``.txt`` (one per line) or ``.jsonl`` file (a ``prompt`` field per
        line; the other fields are metadata the rewards receive), read when the config is validated
        (``toy``: None = the toy world's prompt set). See euphonium/train/prompts.py.
    prompts_per_step, group_size: each step samples ``prompts_per_step`` prompts and ``group_size``
        rollouts of each (advantages are normalised within a prompt's group, across ranks).
    timestep_fraction: fraction of each rollout's recorded SDE steps trained (a random subset per sample).
    inner_epochs: optimisation passes over each step's rollouts (PPO epochs).
    updates_per_step: optimizer updates per step: the batch is split into this many minibatches in a
        fixed order, one update each, so that from the second on the policy has moved and the clip acts
        (None: the algorithm's; the peers' published setups make 2). Warm-up, EMA and ``max_bad_steps``
        count updates; logs and checkpoints count steps.
    micro_batches: the batch is split into this many micro-batches whose gradients are accumulated.
    rewards: outcome rewards by registry name (``euphonium.rewards.build_reward``) with their kwargs.
    reward_weights: weight per named reward part (0 = logged only); None = every part weight 1.
    eval_rewards: rewards only the fixed-set evaluation scores (registry names with kwargs), logged as
        ``reward/eval_only/<part>`` in ``eval.jsonl`` next to the trained ones: a reward the policy is
        not trained on shows over-optimisation of the one it is (a held-out judge of the same quality).
    adv_global_std: divide by the std of the whole batch (Flow-GRPO's option) instead of each group's:
        a group whose rewards barely differ then gets small advantages instead of unit-scale noise.
    combine: ``separate`` clipped terms per reward (upstream) or one ``sum`` of advantages.
    process_weight: weight of the process-reward advantage (Euphonium; 0 turns it off).
    process_advantage: ``none``, ``state`` (upstream: the PRM score of each guided step's input; its
        expected policy gradient is zero) or ``td`` (the change of the PRM score across each trained
        step, guided or not, the outcome reward standing in for the final state; needs a PRM calibrated
        as ``E[r_o | x_sigma]``). None: the algorithm's.
    prm_path: the process reward model (``toy``: None = the committed toy PRM).
    prm_refresh_every: retrain the PRM on fresh rollouts every N steps (0 = never). Each refresh takes
        ``PRMTrainConfig.online_steps`` (4) optimiser steps at ``prm_refresh_lr`` on states drawn from a
        replay buffer of recent rollouts (per rank; under torchrun the gradients are averaged over the
        ranks, so every rank's PRM stays the same).
    prm_refresh_batch_size: rollout states per refresh optimiser step on each rank (>= 2; at most the
        buffer's size): a backbone PRM's step is a transformer forward and backward on this many states,
        so a big one needs a small batch (e.g. 2-4) rather than every rollout of the step at once.
    kl_coef: KL penalty to the reference policy (LoRA: adapter disabled; else a frozen copy).
    distill_coef: explicit distillation loss ``mean((mean_theta - sg(target))^2) / (2 std^2)`` at guided
        steps, not weighted by advantages (docs/DESIGN.md).
    distill_target: ``reference`` (``mean_ref + c g``, the reference policy's mean moved by the guidance:
        its fixed point is the reference tilted by the guidance, so guidance cannot compound) or
        ``policy`` (``sg(mean_theta) + c g``: a push that never stops).
    parallel: under ``torchrun``, ``ddp`` (the gradients all-reduced) or ``fsdp`` (FSDP2: the weights,
        gradients and optimizer states of each transformer block sharded over the ranks).
    context_parallel: N > 1 splits each sample's tokens over groups of N ranks with diffusers' Ulysses
        attention (the transformers with a context-parallel plan: ``toy``, ``wan``, ``flux``; one
        accelerator per rank). N must divide the number of ranks W, the attention heads and the tokens per
        sample; the batch is split over W / N data ranks and ``parallel`` wraps all W
        (euphonium/train/context_parallel.py).
    eval_every: every N steps, before the first and after the last, score ``eval_prompts`` fixed
        prompts, sampled with the deterministic ODE sampler (EMA weights, if any) from fixed noise,
        into ``DIR/eval.jsonl``: the same clips each time, so the curve shows the policy's change
        without the training batches' prompt-draw noise (0 = never).
    eval_prompts: size of that fixed set (prompts and noise drawn from ``seed``; not the sample grid's), or a
        ``.txt``/``.jsonl`` file whose prompts, in order, are the set.
    num_eval_samples: clips in the final sample grid (``samples.gif``/``.png``).
    embedding_cache: a folder where text embeddings are kept on disk (one safetensors file per prompt, under
        a folder per text encoder), shared by ranks and runs; a restart reads them instead of encoding
        again. None: in memory only.
    loggers: where metrics go: ``jsonl`` (always), ``tensorboard``, ``wandb`` (``pip install
        euphonium[wandb]``; the run in ``DIR/wandb``; ``WANDB_MODE=offline`` works without an account).
    wandb: keyword arguments of ``wandb.init`` (``project``, ``entity``, ``name``, ``tags``...).
    """

    algorithm: str = "euphonium_fast"
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: Dict[str, Any] = field(default_factory=dict)
    prompts: Any = None
    prompts_per_step: int = 4
    group_size: int = 4
    timestep_fraction: float = 1.0
    inner_epochs: int = 1
    micro_batches: int = 1
    updates_per_step: Optional[int] = None
    max_steps: int = 200
    seed: int = 0
    lr: float = 5e-5
    lr_warmup_steps: int = 10
    weight_decay: float = 0.0
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    clip_range: float = 1e-4
    adv_clip: float = 5.0
    adv_eps: float = 1e-8
    adv_global_std: bool = False
    # The toy "combined" adherence reward; the parts are logged. Trained separately, a part whose
    # group variance is mostly noise (e.g. direction for this base model) would dominate its
    # normalised advantage.
    rewards: Dict[str, Dict[str, Any]] = field(
        default_factory=lambda: {
            "toy": {"weights": {"color": 1.0, "shape": 1.0, "size": 1.0, "direction": 1.0, "smoothness": 0.0}}
        }
    )
    reward_weights: Optional[Dict[str, float]] = field(
        default_factory=lambda: {
            "combined": 1.0,
            "color": 0.0,
            "shape": 0.0,
            "size": 0.0,
            "direction": 0.0,
            "smoothness": 0.0,
        }
    )
    combine: str = "separate"
    eval_rewards: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    process_weight: float = 1.0
    process_advantage: Optional[str] = None
    prm_path: Optional[str] = None
    prm_refresh_every: int = 0
    prm_refresh_lr: float = 1e-4
    prm_refresh_batch_size: int = 64
    kl_coef: float = 0.0
    distill_coef: float = 0.0
    distill_target: str = "reference"
    ema_decay: Optional[float] = 0.95
    on_policy_tolerance: float = 1e-3
    max_bad_steps: int = 3
    checkpoint_every: int = 20
    keep_checkpoints: int = 2
    parallel: str = "ddp"
    context_parallel: int = 1
    eval_every: int = 25
    eval_prompts: Any = 32
    num_eval_samples: int = 8
    device: str = "auto"
    embedding_cache: Optional[str] = None
    loggers: List[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])
    wandb: Dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        """Check values that types alone don't (raises :class:`ConfigError` naming the key).

        Every float must be finite: a NaN or infinite ``lr``, ``clip_range``, ``kl_coef``... could only
        break the run later (non-finite weights at the first update).
        """
        try:
            self._validate()
            self._resolve_algorithm()
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from None
        return self

    def _validate(self) -> None:
        model = self.model
        check_choice("algorithm", self.algorithm, ALGORITHMS)
        check_choice("model.kind", model.kind, MODEL_KINDS)
        check_choice("model.expert", model.expert, ("both", "high", "low"))
        check_float("model.guidance_scale", model.guidance_scale, minimum=0)
        check_choice("model.dtype", model.dtype, ("float32", "bfloat16", "float16"))
        check_choice("combine", self.combine, ("separate", "sum"))
        if self.process_advantage is not None:
            check_choice("process_advantage", self.process_advantage, ("none", "state", "td"))
        check_choice("distill_target", self.distill_target, ("reference", "policy"))
        if self.updates_per_step is not None:
            check_int("updates_per_step", self.updates_per_step, minimum=1)
        check_choice("parallel", self.parallel, ("ddp", "fsdp"))
        check_int("context_parallel", self.context_parallel, minimum=1)
        if not DEVICE.match(self.device):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if model.kind not in ("toy", "mixture") and not model.path:
            raise ValueError(f"model.path is required for model.kind={model.kind} (a local diffusers pipeline folder)")
        check_int("group_size", self.group_size)
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages are relative within a group), got {self.group_size}")
        for key in (
            "prompts_per_step",
            "inner_epochs",
            "micro_batches",
            "max_steps",
            "checkpoint_every",
            "keep_checkpoints",
            "max_bad_steps",
            "num_eval_samples",
        ):
            check_int(key, getattr(self, key), minimum=1)
        # A batch of pairs at least: the Bradley-Terry loss compares two states.
        check_int("prm_refresh_batch_size", self.prm_refresh_batch_size, minimum=2)
        _check_prompt_data(self)
        for key in ("lr_warmup_steps", "prm_refresh_every", "eval_every"):
            check_int(key, getattr(self, key), minimum=0)
        check_int("seed", self.seed, minimum=0)
        for key in ("lora_rank",):
            check_int(f"model.{key}", getattr(model, key), minimum=0)
        for key in ("num_frames", "height", "width", "max_sequence_length"):
            check_int(f"model.{key}", getattr(model, key), minimum=1)
        check_float("model.lora_alpha", model.lora_alpha, minimum=0, min_open=True, allow_none=True)
        check_float("model.cfg_scale", model.cfg_scale, minimum=0, min_open=True)
        check_float("timestep_fraction", self.timestep_fraction, minimum=0, maximum=1, min_open=True)
        if (self.prompts_per_step * self.group_size) % self.micro_batches:
            raise ValueError(
                f"micro_batches ({self.micro_batches}) must divide prompts_per_step * group_size "
                f"({self.prompts_per_step * self.group_size})"
            )
        for key in ("lr", "clip_range", "max_grad_norm", "adv_eps", "adv_clip", "adam_eps", "prm_refresh_lr"):
            check_float(key, getattr(self, key), minimum=0, min_open=True)
        for key in ("kl_coef", "distill_coef", "process_weight", "weight_decay", "on_policy_tolerance"):
            check_float(key, getattr(self, key), minimum=0)
        check_float("ema_decay", self.ema_decay, minimum=0, maximum=1, min_open=True, max_open=True, allow_none=True)
        if len(self.adam_betas) != 2:
            raise ValueError(f"adam_betas must be two numbers, got {self.adam_betas}")
        for i, beta in enumerate(self.adam_betas):
            check_float(f"adam_betas[{i}]", beta, minimum=0, maximum=1, max_open=True)
        if not self.rewards:
            raise ValueError("rewards must name at least one outcome reward")
        for name, weight in (self.reward_weights or {}).items():
            check_float(f"reward_weights.{name}", weight, minimum=0)

    def _resolve_algorithm(self) -> None:
        """Fill the objective settings the config leaves None from the algorithm's bundle, and remember
        which (``from_algorithm``: what ``config.json`` reports as coming from the algorithm)."""
        filled = getattr(self, "_from_algorithm", {})
        for key, value in OBJECTIVE_PRESETS[self.algorithm].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
                filled[key] = self.algorithm
        object.__setattr__(self, "_from_algorithm", filled)
        local = self.prompts_per_step * self.group_size
        if local < self.updates_per_step:
            raise ValueError(
                f"updates_per_step ({self.updates_per_step}) must be at most the batch, prompts_per_step * "
                f"group_size ({local})"
            )

    @property
    def from_algorithm(self) -> Dict[str, str]:
        """The settings the config left unset, taken from the algorithm's bundle: ``{key: algorithm}``."""
        return dict(getattr(self, "_from_algorithm", {}))

    @property
    def needs_prm(self) -> bool:
        """The run needs a process reward model: to guide its rollouts, or to score states for process credit."""
        guided = self.algorithm in GUIDED_ALGORITHMS and self.sampler.get("guidance", True)
        return bool(guided) or self.process_advantage not in (None, "none")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _check_prompt_data(config: "TrainConfig") -> None:
    """``prompts`` (a list or a .txt/.jsonl path, read into the list here), ``eval_prompts`` (a count or a
    path), ``embedding_cache`` and ``loggers`` (euphonium/train/prompts.py, euphonium/train/logging.py)."""
    from euphonium.train import prompts

    prompts.check_prompts_value(config.prompts)
    prompts.resolve_prompts(config)
    prompts.check_eval_prompts_value(config.eval_prompts)
    prompts.prompt_metadata(config)  # one metadata per prompt text across the training and evaluation files
    if config.embedding_cache is not None and not config.embedding_cache:
        raise ValueError("embedding_cache must be a folder or null (no cache on disk)")
    unknown = sorted(set(config.loggers) - {"jsonl", "tensorboard", "wandb"})
    if unknown or "jsonl" not in config.loggers:
        raise ValueError(
            f"loggers must list jsonl (resume and the reward curve read it) and optionally tensorboard and wandb, "
            f"got {config.loggers}"
        )
    if "wandb" in config.loggers:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ValueError("loggers lists wandb, which is not installed: pip install 'euphonium[wandb]'")


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """``value`` converted to ``annotation`` where that is lossless (int -> float), else ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(key, value, inner[0])
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation in (str, bool):
        if isinstance(value, annotation):
            return value
    elif origin in (list, List):
        if isinstance(value, (list, tuple)):
            return [_check_type(f"{key}[{i}]", v, args[0]) if args else v for i, v in enumerate(value)]
    elif origin in (dict, Dict):
        if isinstance(value, dict):
            return {
                k: (_check_type(f"{key}.{k}", v, args[1]) if args and args[1] is not Any else v)
                for k, v in value.items()
            }
    elif annotation is Any:
        return value
    name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"{key} must be of type {name}, got {value!r} ({type(value).__name__})")


def _apply(obj: Any, values: Dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    fields = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {full!r}; valid keys: {sorted(fields)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full} must be a mapping of its fields, got {value!r}")
            _apply(current, value, prefix=f"{full}.")
        else:
            setattr(obj, key, _check_type(full, value, hints[key]))


def parse_override(text: str) -> Tuple[List[str], Any]:
    """``"a.b=value"`` as ``(["a", "b"], value)`` with ``value`` parsed as YAML (``1e-4``, ``[1, 2]``, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. lr=1e-4 or model.path=/data/wan)")
    key, raw = text.split("=", 1)
    path = key.split(".")
    if not all(path):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({' '.join(str(err).split())})") from None
    # YAML 1.1 reads "1e-4" as a string; numbers written that way are floats for us.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in "e.") else value
        except ValueError:
            pass
    return path, value


def _set_path(obj: Any, path: List[str], value: Any) -> None:
    """Set ``obj.<path>`` to ``value``: fields of nested dataclasses, then keys inside a dict field.

    A path that ends at a dict field replaces the dict (``reward_weights={a: 1}``); a path that goes
    into it updates one key and keeps the others (``reward_weights.a=1``, ``sampler.num_steps=12``).
    """
    for depth, name in enumerate(path):
        full = ".".join(path[: depth + 1])
        fields = {f.name for f in dataclasses.fields(obj)}
        if name not in fields:
            raise ConfigError(f"unknown config key {full!r}; valid keys: {sorted(fields)}")
        current = getattr(obj, name)
        rest = path[depth + 1 :]
        if dataclasses.is_dataclass(current) and rest:
            obj = current
            continue
        if rest:
            if not isinstance(current, dict):
                raise ConfigError(
                    f"{full} is a {type(current).__name__}, not a mapping: {'.'.join(path)} has no meaning"
                )
            updated = copy.deepcopy(current)
            target = updated
            for key in rest[:-1]:
                if not isinstance(target.get(key, {}), dict):
                    raise ConfigError(f"{full}.{key} is not a mapping: {'.'.join(path)} has no meaning")
                target = target.setdefault(key, {})
            target[rest[-1]] = value
            value = updated
        _apply(obj, {name: value}, prefix=".".join(path[:depth]) + "." if depth else "")
        return


# The configs shipped with the package: ``--config NAME`` finds them from any working directory.
PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def available_configs() -> List[str]:
    """The names of the configs shipped in ``euphonium/configs`` (``--config NAME``), sorted."""
    return sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))


def resolve_config(path: str) -> Path:
    """The YAML file ``--config path`` means: an existing file, else a packaged config by bare name.

    ``toy`` and ``toy.yaml`` both name ``euphonium/configs/toy.yaml``, from any working directory; a
    file at the given path wins over a packaged config of the same name. Anything else is a
    :class:`ConfigError` that lists the packaged names.
    """
    given = Path(path)
    if given.is_file():
        return given
    if path and given.name == path:  # a bare name, no directory part
        packaged = PACKAGED_CONFIGS / (path if path.endswith(".yaml") else path + ".yaml")
        if packaged.is_file():
            return packaged
    raise ConfigError(
        f"--config {path}: no such file and no packaged config of that name "
        f"(packaged: {', '.join(available_configs())})"
    )


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> TrainConfig:
    """The defaults, updated by the YAML config ``path`` and then by ``key=value`` ``overrides`` in order.

    ``path`` is a file or the name of a packaged config (see :func:`resolve_config`). The file replaces
    the values it names (a mapping such as ``reward_weights`` as a whole); an override replaces what
    its key names, so ``reward_weights.direction=2`` updates one weight.
    """
    config = TrainConfig()
    if path is not None:
        p = resolve_config(path)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"--config {path} is not valid YAML: {' '.join(str(err).split())}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path} must hold a mapping of keys, got {type(loaded).__name__}")
        _apply(config, loaded)
    for text in overrides or []:
        _set_path(config, *parse_override(text))
    return config.validate()


def check_device(config: TrainConfig) -> None:
    """Raise :class:`ConfigError` when ``config.device`` names a device this machine lacks (imports torch)."""
    import torch

    device = config.device
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device} but CUDA is not available here (use device=auto or cpu)")
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device={device} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError("device=mps but MPS is not available here (use device=auto or cpu)")


def config_from_dict(values: Dict[str, Any]) -> TrainConfig:
    """A validated config from a (resolved) dict such as ``TrainConfig.to_dict()``."""
    config = TrainConfig()
    _apply(config, values)
    return config.validate()
