"""The trainer's distributed glue: process group, DDP/FSDP2 wrapping, reductions of logged values, and
an FSDP2 optimizer as a checkpoint sees it. With one process every function is a no-op."""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from euphonium.train.config import ConfigError


def init_distributed() -> Tuple[int, int, torch.device]:
    """``(rank, world_size, device)``; initialises the process group under ``torchrun``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def wrap_for_training(transformer: torch.nn.Module, parallel: str, world: int, device: torch.device):
    """The module training forwards go through: the transformer itself, FSDP2 (``parallel="fsdp"``:
    each of its ``blocks``, then the root) or DDP, which all-reduces the gradients."""
    if world == 1:
        return transformer
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in getattr(transformer, "blocks", []):
            fully_shard(block)
        return fully_shard(transformer)
    from torch.nn.parallel import DistributedDataParallel

    # Wan2.2 training both experts: a micro-batch of one noise range leaves the other expert's weights unused.
    several = len(getattr(transformer, "trained", ())) > 1
    return DistributedDataParallel(
        transformer, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=several
    )


class RankReducer:
    """Sums, means and maxima of logged Python floats over the ``world`` ranks of ``group`` (None: all ranks;
    float64, one all-reduce each)."""

    def __init__(self, world: int, device: torch.device, group: Optional[dist.ProcessGroup] = None):
        self.world, self.group = world, group
        # gloo reduces CPU tensors; NCCL needs them on the GPU.
        self.device = device if device.type == "cuda" else torch.device("cpu")

    def sum(self, values: Dict[str, float]) -> Dict[str, float]:
        if self.world == 1:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.group)
        return dict(zip(keys, t.tolist()))

    def mean(self, values: Dict[str, float]) -> Dict[str, float]:
        return {k: v / self.world for k, v in self.sum(values).items()}

    def max(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return float(t)


class FullOptimizerState:
    """An optimizer over FSDP2-sharded parameters as a checkpoint sees it: full states keyed by parameter name.

    Its own ``state_dict()`` holds this rank's shards only, so rank 0 alone cannot save it:
    :meth:`gather` (a collective, every rank) collects the full states with
    ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``, and :meth:`load_state_dict`
    (every rank) shards a full state back with ``set_optimizer_state_dict``.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer, self.full = model, optimizer, None

    def gather(self) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        self.full = get_optimizer_state_dict(
            self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def state_dict(self) -> Dict:
        return self.full

    def load_state_dict(self, state: Dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True))


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective), or ``t`` itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def place_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor) with the dtype, device and, for an FSDP2 parameter, the sharding of ``like``."""
    if hasattr(like, "full_tensor"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(like.dtype), like.device_mesh, like.placements)
    return value.to(device=like.device, dtype=like.dtype)


def check_groups_fit_ranks(local_batch: int, group_size: int, sampler) -> None:
    """A prompt group may span ranks (its advantages are normalised over all ranks), but its members are
    then sampled by different processes: refuse the samplers whose group members must share something
    drawn once per rollout (the initial noise, a random SDE window), which separate processes cannot."""
    if local_batch % group_size == 0:
        return
    shared = [name for name in ("same_initial_noise", "sde_window_size") if getattr(sampler, name)]
    if shared:
        raise ConfigError(
            f"a prompt group of {group_size} spans ranks (each rank holds {local_batch} samples), but the sampler "
            f"shares {' and '.join(shared)} within a group, which separate processes cannot: make "
            "prompts_per_step * group_size / world_size a multiple of group_size"
        )
