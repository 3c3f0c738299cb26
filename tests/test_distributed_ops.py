"""ops.gather_group_advantages with 2 gloo processes on the CPU: groups span ranks."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from euphonium import ops

# Unequal counts per rank, so the gather must pad.
COUNTS = (7, 13)


def _worker(rank, init_file, out_dir, rewards, process, ids):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(COUNTS))
    try:
        start = sum(COUNTS[:rank])
        rows = slice(start, start + COUNTS[rank])
        results = {
            "ids": ops.gather_group_advantages(rewards[rows], group_ids=ids[rows]),
            "ids_2d_global_clip": ops.gather_group_advantages(
                process[rows], group_ids=ids[rows].to(torch.int32), global_std=True, clip=1.0, unbiased=False
            ),
            "contiguous": ops.gather_group_advantages(rewards[rows].bfloat16(), group_size=5),
        }
        bad = rewards[rows].clone()
        if rank == 1:
            bad[4] = torch.inf
        try:
            ops.gather_group_advantages(bad, group_ids=ids[rows])
        except ValueError as e:
            results["error"] = str(e)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_groups_spanning_ranks_match_single_process():
    total = sum(COUNTS)
    rewards = torch.randn(total) * 2
    process = torch.randn(total, 3)
    # Four prompts of five samples each, scattered over both ranks.
    ids = (torch.arange(total) // 5)[torch.randperm(total)]
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "init")
        mp.spawn(_worker, args=(init_file, out_dir, rewards, process, ids), nprocs=len(COUNTS), join=True)
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(len(COUNTS))]

    expected = {
        "ids": ops.group_advantages(rewards, group_ids=ids),
        "ids_2d_global_clip": ops.group_advantages(process, group_ids=ids, global_std=True, clip=1.0, unbiased=False),
        "contiguous": ops.group_advantages(rewards.bfloat16(), group_size=5),
    }
    for name, full in expected.items():
        gathered = torch.cat([r[name] for r in results])
        assert gathered.shape == full.shape and gathered.dtype == full.dtype
        torch.testing.assert_close(gathered, full, rtol=0, atol=0, msg=name)
    for r in results:
        assert r["error"] == (
            "rewards has non-finite values (first at sample 4 of rank 1, sample 11 of the gathered batch)"
        )


def _dual_worker(rank, init_file, out_dir, outcome, states, guided, ids):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(COUNTS))
    try:
        start = sum(COUNTS[:rank])
        rows = slice(start, start + COUNTS[rank])
        local = {name: r[rows] for name, r in outcome.items()}
        results = {}
        for form, process in (("td", states[rows]), ("state", states[rows, :-1])):
            results[form] = ops.dual_reward_advantages(
                local, process, guided=guided, process_form=form, group_ids=ids[rows], clip=2.0, distributed=True
            )
        results["global_std"] = ops.dual_reward_advantages(
            local, states[rows], process_form="td", group_ids=ids[rows], global_std=True, distributed=True
        )
        bad = states[rows].clone()
        if rank == 1:
            bad[3, 1] = torch.nan
        try:
            ops.dual_reward_advantages(local, bad, process_form="td", group_ids=ids[rows], distributed=True)
        except ValueError as e:
            results["error"] = str(e)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_dual_reward_advantages_groups_spanning_ranks_match_single_process():
    total, steps = sum(COUNTS), 3
    outcome = {"a": torch.randn(total), "b": torch.rand(total)}
    states = torch.randn(total, steps + 1)
    guided = torch.tensor([True, False, True])
    ids = (torch.arange(total) // 5)[torch.randperm(total)]
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "init")
        args = (init_file, out_dir, outcome, states, guided, ids)
        mp.spawn(_dual_worker, args=args, nprocs=len(COUNTS), join=True)
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(len(COUNTS))]

    expected = {
        form: ops.dual_reward_advantages(
            outcome, process, guided=guided, process_form=form, group_ids=ids, clip=2.0, distributed=True
        )
        for form, process in (("td", states), ("state", states[:, :-1]))
    }
    expected["global_std"] = ops.dual_reward_advantages(
        outcome, states, process_form="td", group_ids=ids, global_std=True
    )
    for name, (full_o, full_p) in expected.items():
        for key in outcome:
            gathered = torch.cat([r[name][0][key] for r in results])
            torch.testing.assert_close(gathered, full_o[key], rtol=0, atol=0, msg=f"{name} {key}")
        gathered = torch.cat([r[name][1] for r in results])
        assert gathered.shape == full_p.shape == (total, steps)
        torch.testing.assert_close(gathered, full_p, rtol=0, atol=0, msg=name)
    # The TD form really uses the states across ranks: not the state form's values.
    assert not torch.equal(expected["td"][1], expected["state"][1])
    for r in results:
        assert r["error"] == "process_rewards at state 1 has non-finite values (first at sample 3) on rank 1"


def test_without_distributed_is_group_advantages():
    assert not dist.is_initialized()
    rewards = torch.randn(12, 2)
    ids = torch.randint(0, 3, (12,))
    torch.testing.assert_close(
        ops.gather_group_advantages(rewards, group_ids=ids, clip=2.0),
        ops.group_advantages(rewards, group_ids=ids, clip=2.0),
        rtol=0,
        atol=0,
    )
