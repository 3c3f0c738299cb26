"""euphonium.train under ``torch.distributed.run`` with 2 gloo processes on the CPU: DDP and FSDP2.

Each rank rolls out its own half of every step's batch (a prompt group may span ranks), advantages
are gathered across ranks, gradients are averaged (DDP all-reduce, FSDP2 reduce-scatter) and only
rank 0 writes. FSDP2 full fine-tuning must train the same weights as DDP and resume exactly.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from euphonium.rewards.prm import LatentRewardModel
from euphonium.toy import build_toy_model, load_toy_model, save_toy_model

pytestmark = pytest.mark.distributed

REQUIRED = (
    "step",
    "reward_mean",
    "loss",
    "clip_frac",
    "approx_kl",
    "ratio_max_dev",
    "grad_norm",
    "lr",
    "world_size",
    "seconds",
)
TOY_PARTS = ("color", "shape", "size", "direction", "smoothness")
LR = 3e-4

# Runs the command line's main() three times in the same 2 processes (one launch): 2 steps straight,
# then 1 step and a resume to 2 in another directory.
RESUME_DRIVER = textwrap.dedent("""
    import sys
    from euphonium.train.__main__ import main

    out, common = sys.argv[1], sys.argv[2:]
    for name, flags, steps in (("straight", ["checkpoint_every=1"], 2), ("resumed", [], 1),
                               ("resumed", ["--resume"], 2)):
        code = main(["--output-dir", f"{out}/{name}", *flags, *common, f"max_steps={steps}"])
        if code:
            sys.exit(code)
""")

# Trains, then every rank dumps the weights it holds, to compare the replicas.
DUMP_DRIVER = textwrap.dedent("""
    import sys
    from safetensors.torch import save_file
    from euphonium.train import Trainer, load_config

    out, dump, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    trainer = Trainer(load_config(None, overrides), out)
    trainer.train()
    state = {k: v.contiguous() for k, v in trainer._trainable_state().items()}
    save_file(state, f"{dump}/rank{trainer.rank}.safetensors")
""")

# Trains with a PRM refresh every step, recording the rewards each rank refreshes on; every rank dumps its
# PRM before and after and those rewards.
PRM_DRIVER = textwrap.dedent("""
    import sys
    import torch
    from safetensors.torch import save_file
    from euphonium.train import Trainer, load_config

    out, dump, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    trainer = Trainer(load_config(None, overrides), out)
    prm, update, seen = trainer.policy.prm, trainer.prm_trainer.update, []
    state = {f"initial.{k}": v.clone() for k, v in prm.state_dict().items()}

    def record(x0, prompt_embeds, rewards, **kwargs):
        seen.append(rewards.detach().float().cpu())
        return update(x0, prompt_embeds, rewards, **kwargs)

    trainer.prm_trainer.update = record
    trainer.train()
    state.update({f"final.{k}": v for k, v in prm.state_dict().items()})
    state.update({f"rewards.{i}": r for i, r in enumerate(seen)})
    save_file({k: v.contiguous() for k, v in state.items()}, f"{dump}/rank{trainer.rank}.safetensors")
""")


@pytest.fixture(scope="module")
def toy_assets(tmp_path_factory):
    """A random toy model and PRM (the committed ones are tested elsewhere; these load fast)."""
    root = tmp_path_factory.mktemp("assets")
    transformer, text_encoder = build_toy_model(seed=int(torch.randint(0, 2**31, ())))
    save_toy_model(transformer, text_encoder, root / "toy")
    LatentRewardModel(in_channels=3, text_dim=text_encoder.config.dim).save_pretrained(root / "prm")
    return root


@pytest.fixture(scope="module")
def run_seed():
    """One trainer seed for the module's runs (DDP and FSDP must see the same rollouts)."""
    return int(torch.randint(0, 2**31, ()))


def overrides(assets, seed, **extra):
    # 2 prompts x 2 rollouts over 2 ranks: each rank holds one group.
    values = {
        "model.path": assets / "toy",
        "prm_path": assets / "prm",
        "prompts_per_step": 2,
        "group_size": 2,
        "sampler.num_steps": 4,
        "sampler.guidance_start": 2,
        "max_steps": 2,
        "num_eval_samples": 2,
        "lr": LR,
        "seed": seed,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def torchrun(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def check_rank_0_wrote_once(out, steps):
    """One run's outputs, written by rank 0 alone (each writer would leave its own event file / temp dir)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    for row in rows:
        assert set(REQUIRED) <= set(row) and {f"reward/{p}" for p in TOY_PARTS} <= set(row)
        assert row["world_size"] == 2 and row["ratio_max_dev"] < 1e-3
        assert all(v == v for v in row.values() if isinstance(v, float))  # no NaN
    # Event files are named events.out.tfevents.<time>.<host>.<pid>.<n>: one writing process.
    assert len({p.name.rsplit(".", 2)[1] for p in (out / "tensorboard").glob("events.out.tfevents.*")}) == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{s}" for s in steps]
    assert json.loads((out / "checkpoints" / f"step-{steps[-1]}" / "state.json").read_text())["world_size"] == 2
    for name in ("reward_curve.png", "samples.gif", "config.json"):
        assert (out / name).is_file()
    return rows


@pytest.fixture(scope="module")
def ddp_run(toy_assets, run_seed):
    """``torchrun --nproc_per_node 2 -m euphonium.train``: the toy world, Euphonium, DDP full fine-tuning."""
    out = toy_assets / "ddp"
    torchrun("-m", "euphonium.train", "--output-dir", out, *overrides(toy_assets, run_seed), cwd=toy_assets)
    return out


def test_ddp_trains_and_only_rank_0_writes(ddp_run, toy_assets, run_seed, tmp_path):
    rows = check_rank_0_wrote_once(ddp_run, steps=[2])
    assert "process_reward_mean" in rows[0]
    # The evaluation set (prompts and initial noise) does not depend on the number of ranks: before
    # training, 2 ranks' halves score what one process scores for the whole set.
    evals = [json.loads(line) for line in (ddp_run / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals] == [0, 2]
    from euphonium.train import Trainer, load_config

    single = Trainer(load_config(None, overrides(toy_assets, run_seed)), tmp_path / "single").evaluate()
    assert single.keys() == evals[0].keys() - {"step"}
    for key, value in single.items():
        assert evals[0][key] == pytest.approx(value, abs=1e-5), key
    trained = load_file(str(ddp_run / "checkpoints" / "step-2" / "trainable.safetensors"))
    initial = dict(load_toy_model(str(toy_assets / "toy"))[0].named_parameters())
    assert trained.keys() == initial.keys()  # full fine-tuning
    moved = [k for k in trained if not torch.equal(trained[k], initial[k].detach())]
    assert len(moved) > len(trained) // 2


def test_fsdp2_trains_as_ddp_and_resumes_exactly(ddp_run, toy_assets, run_seed):
    """FSDP2 (``parallel=fsdp``, full fine-tuning) on the same seed gives DDP's weights, and a run
    resumed from its step-1 checkpoint (optimizer states sharded back from the full saved ones) ends
    with the weights, EMA and optimizer of the straight run."""
    out = toy_assets / "fsdp"
    driver = toy_assets / "fsdp_resume.py"
    driver.write_text(RESUME_DRIVER)
    proc = torchrun(driver, out, *overrides(toy_assets, run_seed, parallel="fsdp", ema_decay=0.9), cwd=toy_assets)
    assert f"resumed from {out / 'resumed' / 'checkpoints' / 'step-1'} at step 1" in proc.stdout
    check_rank_0_wrote_once(out / "straight", steps=[1, 2])
    check_rank_0_wrote_once(out / "resumed", steps=[1, 2])

    ddp = load_file(str(ddp_run / "checkpoints" / "step-2" / "trainable.safetensors"))
    fsdp = load_file(str(out / "straight" / "checkpoints" / "step-2" / "trainable.safetensors"))
    assert fsdp.keys() == ddp.keys()
    # Adam moves each weight by up to ~lr per step; gradients of the two wrappers agree to rounding.
    for name in ddp:
        torch.testing.assert_close(fsdp[name], ddp[name], atol=LR / 10, rtol=0, msg=name)

    for name in ("trainable", "ema"):
        straight = load_file(str(out / "straight" / "checkpoints" / "step-2" / f"{name}.safetensors"))
        resumed = load_file(str(out / "resumed" / "checkpoints" / "step-2" / f"{name}.safetensors"))
        assert straight.keys() == resumed.keys()
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), name
    optim = [
        torch.load(out / run / "checkpoints" / "step-2" / "optim.pt", weights_only=False)["optimizer"]
        for run in ("straight", "resumed")
    ]
    # Full (unsharded) Adam states keyed by parameter name, whatever the number of ranks.
    assert set(optim[0]["state"]) == set(fsdp)
    for name, state in optim[0]["state"].items():
        assert state["exp_avg"].shape == fsdp[name].shape
        assert torch.equal(state["exp_avg_sq"], optim[1]["state"][name]["exp_avg_sq"])


def test_ddp_lora_replicas_stay_identical(toy_assets, run_seed, tmp_path):
    """LoRA through DDP as the Wan config trains (gradient checkpointing, KL to the adapter-disabled
    model, gradient accumulation over micro-batches under no_sync): both ranks hold the same adapter."""
    driver = tmp_path / "dump.py"
    driver.write_text(DUMP_DRIVER)
    out, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    torchrun(
        driver,
        out,
        dump,
        *overrides(
            toy_assets,
            run_seed,
            **{"model.lora_rank": 2, "model.gradient_checkpointing": "true", "kl_coef": 0.01, "micro_batches": 2},
        ),
        cwd=tmp_path,
    )
    check_rank_0_wrote_once(out, steps=[2])
    ranks = [load_file(str(dump / f"rank{r}.safetensors")) for r in (0, 1)]
    saved = load_file(str(out / "checkpoints" / "step-2" / "trainable.safetensors"))
    assert saved.keys() == ranks[0].keys() == ranks[1].keys()
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert all(torch.equal(ranks[0][k], ranks[1][k]) and torch.equal(saved[k], ranks[0][k]) for k in saved)
    assert all(saved[k].abs().max() > 0 for k in saved if ".lora_B." in k)  # B starts at zero: it trained


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_prm_refresh_keeps_the_replicas_identical(toy_assets, run_seed, tmp_path, parallel):
    """``prm_refresh_every`` under torchrun: each rank refreshes its PRM replica on its own rollouts, the gradients
    averaged over the ranks and an unfitted reward scale fitted on both ranks' rewards: the replicas stay
    bit-identical (each rank alone would train its replica on its own half of the batch)."""
    driver = tmp_path / "dump_prm.py"
    driver.write_text(PRM_DRIVER)
    out, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    extra = {"prm_refresh_every": 1, "prm_refresh_batch_size": 2, "parallel": parallel}
    torchrun(driver, out, dump, *overrides(toy_assets, run_seed, **extra), cwd=tmp_path)
    rows = check_rank_0_wrote_once(out, steps=[2])
    assert all(r["prm/loss"] == r["prm/loss"] and r["prm/buffer_size"] == 2 * r["step"] for r in rows)
    ranks = [load_file(str(dump / f"rank{r}.safetensors")) for r in (0, 1)]
    assert not torch.equal(ranks[0]["rewards.0"], ranks[1]["rewards.0"])  # each rank refreshed on its own rollouts
    final = sorted(k for k in ranks[0] if k.startswith("final."))
    assert final and all(torch.equal(ranks[0][k], ranks[1][k]) for k in final)
    moved = [k for k in final if not torch.equal(ranks[0][k], ranks[0]["initial." + k[len("final.") :]])]
    assert [k for k in moved if k.endswith(".weight")]  # it trained
    # The reward scale (unfitted in this PRM) fitted on the first refresh's rewards of both ranks together.
    both = torch.cat([ranks[0]["rewards.0"], ranks[1]["rewards.0"]])
    assert bool(ranks[0]["final.reward_stats_fitted"]) and not bool(ranks[0]["initial.reward_stats_fitted"])
    assert float(ranks[0]["final.reward_mean"]) == pytest.approx(float(both.mean()), abs=1e-6)
    assert float(ranks[0]["final.reward_std"]) == pytest.approx(float(both.std()), abs=1e-6)
