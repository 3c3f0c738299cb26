"""Group-relative advantages when a prompt's samples are spread over several ranks."""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from euphonium._checks import check_float_tensor, check_index_tensor
from euphonium.ops.advantages import group_advantages


def gather_group_advantages(
    rewards: torch.Tensor,
    *,
    group_size: Optional[int] = None,
    group_ids: Optional[torch.Tensor] = None,
    eps: float = 1e-8,
    unbiased: bool = True,
    global_std: bool = False,
    clip: Optional[float] = None,
    process_group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """:func:`~euphonium.ops.group_advantages` over the rewards of every rank; this rank's rows back.

    With ``torch.distributed`` initialised (and more than one rank in ``process_group``), the
    rewards ``[B_r]`` or ``[B_r, K]`` of every rank ``r`` (counts may differ between ranks) and their
    ``group_ids`` are all-gathered in rank order into the global batch; advantages are computed
    over the global groups, so a prompt's samples may live on any ranks, and the rows of this rank
    are returned: the same values a single process would compute on the concatenated batch.
    ``group_ids`` must be global ids (e.g. the prompt's index in the global batch); ``group_size``
    means contiguous groups of the concatenated batch (rank 0's rows first). ``global_std`` is then
    the std over all ranks. Without ``torch.distributed`` this is :func:`group_advantages`.

    Every rank must call it (it is a collective); tensors must live where the backend expects them
    (CPU for gloo, CUDA for NCCL). Non-finite rewards raise the same ValueError on every rank,
    naming the rank and the local sample.
    """
    options = dict(eps=eps, unbiased=unbiased, global_std=global_std, clip=clip)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(process_group) == 1:
        return group_advantages(rewards, group_size=group_size, group_ids=group_ids, **options)

    check_float_tensor("rewards", rewards)
    if rewards.dim() > 2:
        raise ValueError(f"rewards must be [B] or [B, K], got shape {tuple(rewards.shape)}")
    if (group_size is None) == (group_ids is None):
        raise ValueError("give exactly one of group_size (contiguous groups) or group_ids (a [B] tensor of ids)")
    local = rewards.shape[0]
    if group_ids is not None:
        check_index_tensor("group_ids", group_ids, local, "rewards", rewards)

    world = dist.get_world_size(process_group)
    rank = dist.get_rank(process_group)
    device = rewards.device
    cols = rewards.reshape(local, -1).shape[1]
    shape = torch.tensor([local, cols, rewards.dim()], dtype=torch.int64, device=device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=process_group)
    shapes = torch.stack(shapes).tolist()
    if any(s[1:] != shapes[0][1:] for s in shapes):
        raise ValueError(
            f"rewards must have the same number of columns on every rank; "
            f"(batch, columns, dims) per rank: {[tuple(s) for s in shapes]}"
        )
    counts = [s[0] for s in shapes]
    padded = max(counts)

    # float64 carries every reward dtype exactly; each rank casts back to its own dtype.
    all_rewards = _gather_padded(rewards.reshape(local, cols).to(torch.float64), padded, counts, process_group)
    bad = ~torch.isfinite(all_rewards)
    if bool(bad.any()):
        index = bad.any(dim=1).nonzero()[0].item()
        owner = max(r for r in range(world) if sum(counts[:r]) <= index)
        raise ValueError(
            f"rewards has non-finite values (first at sample {index - sum(counts[:owner])} "
            f"of rank {owner}, sample {index} of the gathered batch)"
        )
    all_ids = None
    if group_ids is not None:
        all_ids = _gather_padded(group_ids.to(torch.int64), padded, counts, process_group)
    adv = group_advantages(all_rewards.to(rewards.dtype), group_size=group_size, group_ids=all_ids, **options)
    start = sum(counts[:rank])
    return adv[start : start + local].reshape(rewards.shape)


def _gather_padded(t: torch.Tensor, padded: int, counts: List[int], group) -> torch.Tensor:
    """All-gather ``t`` (``[count_r, ...]`` on rank ``r``) by padding to ``padded`` rows; concatenated."""
    buf = t.new_zeros((padded, *t.shape[1:]))
    buf[: t.shape[0]] = t
    parts = [torch.empty_like(buf) for _ in counts]
    dist.all_gather(parts, buf, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, counts)])
