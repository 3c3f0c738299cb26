"""Context parallelism in the trainer (``context_parallel: N``, euphonium/train/context_parallel.py).

On the CPU with gloo (diffusers' Ulysses attention on the toy world's small Wan transformer): 2 processes as one
context-parallel group, with DDP and with FSDP2, train the weights one process trains on the same batch; 4
processes as 2 data ranks x 2 train the weights of 2 plain DDP processes (the same data split: rollout noise is
drawn per data rank). diffusers places each rank on ``torch.device(accelerator, rank %
torch.accelerator.device_count())``, a division by zero on a machine without accelerators, so the test's driver
patches ``device_count`` to 1 before the trainer is built: on gloo nothing else of diffusers' Ulysses path uses
that device. The library itself refuses context parallelism on such a machine (tested below).

The ``gpu`` test is the first comparison on 2 CUDA devices (skipped with fewer). It has not been run: no
multi-GPU machine was available.
"""

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from euphonium.rewards.prm import LatentRewardModel
from euphonium.toy import build_toy_model, load_toy_model, save_toy_model
from euphonium.train import Trainer, load_config
from euphonium.train.config import ConfigError, ModelConfig, TrainConfig
from euphonium.train.context_parallel import (
    RankLayout,
    check_context_parallel,
    check_transformer,
    enable_context_parallel,
)

LR = 3e-4
# Two warm-up steps (lr_warmup_steps 10) move each weight by at most LR / 10 + 2 LR / 10 under Adam.
MOVED = 3 * LR / 10

# Runs main() once per named set of overrides in the same processes (one launch).
DRIVER = textwrap.dedent("""
    import json
    import sys
    import torch

    if torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1  # see the test module's docstring
    from euphonium.train.__main__ import main

    out, runs, common = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
    for name, extra in runs.items():
        code = main(["--output-dir", f"{out}/{name}", *common, *extra])
        if code:
            sys.exit(code)
""")
# One context-parallel group with either wrapper.
IN_ONE_GROUP = {"cp_ddp": ["context_parallel=2"], "cp_fsdp": ["context_parallel=2", "parallel=fsdp"]}


@pytest.fixture(scope="module")
def toy_assets(tmp_path_factory):
    """A random toy model and PRM (they load fast)."""
    root = tmp_path_factory.mktemp("assets")
    transformer, text_encoder = build_toy_model(seed=int(torch.randint(0, 2**31, ())))
    save_toy_model(transformer, text_encoder, root / "toy")
    LatentRewardModel(in_channels=3, text_dim=text_encoder.config.dim).save_pretrained(root / "prm")
    return root


@pytest.fixture(scope="module")
def run_seed():
    return int(torch.randint(0, 2**31, ()))


def overrides(assets, seed, **extra):
    # 2 prompts x 2 rollouts (one group per data rank with 2); guided steps; evaluations before and after.
    values = {
        "model.path": assets / "toy",
        "prm_path": assets / "prm",
        "prompts_per_step": 2,
        "group_size": 2,
        "sampler.num_steps": 4,
        "sampler.guidance_start": 2,
        "max_steps": 2,
        "eval_every": 2,
        "eval_prompts": 4,
        "num_eval_samples": 2,
        "loggers": "[jsonl]",
        "lr": LR,
        "seed": seed,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def launch(nproc, out, runs, common, *, device="cpu"):
    """``torchrun --nproc_per_node nproc DRIVER``: the ``runs`` ({name: overrides}) into ``out/name``."""
    out.mkdir(parents=True, exist_ok=True)
    driver = out / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd += [str(driver), str(out), json.dumps(runs), *map(str, common)]
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_same_training(run, reference, world):
    """The same rollouts, rewards, gradient norms (a missing factor N in the loss would halve them; Adam and
    the clip would hide it in the weights), evaluations and weights."""
    assert all(r["world_size"] == world and r["ratio_max_dev"] < 1e-3 for r in rows(run / "metrics.jsonl"))
    for name in ("metrics.jsonl", "eval.jsonl"):
        got, want = rows(run / name), rows(reference / name)
        assert [r["step"] for r in got] == [r["step"] for r in want]
        for a, b in zip(got, want):
            for key in (k for k in b if k.startswith("reward") or k == "grad_norm"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (run.name, name, a["step"], key)
    trained = load_file(str(run / "checkpoints" / "step-2" / "trainable.safetensors"))
    want = load_file(str(reference / "checkpoints" / "step-2" / "trainable.safetensors"))
    assert trained.keys() == want.keys()
    # The split attention and the partial gradients summed over the group change the gradients in the 7th
    # digit; Adam turns that into a few float32 ulps of the weights (measured: 1.2e-7), against updates of
    # up to MOVED.
    for key in want:
        torch.testing.assert_close(trained[key], want[key], atol=MOVED / 100, rtol=0, msg=key)


def check_moved(run, assets):
    """The weights moved far beyond the comparisons' tolerance (so that they can fail)."""
    trained = load_file(str(run / "checkpoints" / "step-2" / "trainable.safetensors"))
    initial = dict(load_toy_model(str(assets / "toy"))[0].named_parameters())
    assert max(float((trained[k] - initial[k].detach()).abs().max()) for k in trained) > MOVED / 10


@pytest.fixture(scope="module")
def two_ranks(toy_assets, run_seed, tmp_path_factory):
    """2 gloo processes: one context-parallel group (DDP, FSDP2) and plain DDP (2 data ranks)."""
    out = tmp_path_factory.mktemp("two_ranks")
    launch(2, out, {**IN_ONE_GROUP, "ddp": []}, overrides(toy_assets, run_seed))
    return out


def train_one_process(assets, seed, out, device):
    Trainer(load_config(None, overrides(assets, seed, device=device)), out).train()
    return out


@pytest.mark.distributed
def test_one_group_of_two_trains_the_weights_of_one_process(two_ranks, toy_assets, run_seed, tmp_path):
    single = train_one_process(toy_assets, run_seed, tmp_path / "single", "cpu")
    for name in IN_ONE_GROUP:
        check_same_training(two_ranks / name, single, world=2)
    check_moved(single, toy_assets)


@pytest.mark.distributed
def test_two_data_ranks_of_two_train_the_weights_of_plain_ddp(two_ranks, toy_assets, run_seed, tmp_path):
    """2 data ranks x 2 with FSDP2 over all 4: the batch split, advantages gathered and evaluation summed over the
    data ranks only, as 2 plain DDP processes do."""
    launch(4, tmp_path, {"cp_fsdp": ["context_parallel=2", "parallel=fsdp"]}, overrides(toy_assets, run_seed))
    check_same_training(tmp_path / "cp_fsdp", two_ranks / "ddp", world=4)
    check_moved(two_ranks / "ddp", toy_assets)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_one_group_of_two_gpus_trains_the_weights_of_one_gpu(toy_assets, run_seed, tmp_path):
    launch(2, tmp_path / "cp", IN_ONE_GROUP, overrides(toy_assets, run_seed), device="cuda")
    single = train_one_process(toy_assets, run_seed, tmp_path / "single", "cuda")
    for name in IN_ONE_GROUP:
        check_same_training(tmp_path / "cp" / name, single, world=2)


# ------------------------------------------------------------------------------------------------
# Validation (one process)
# ------------------------------------------------------------------------------------------------


def config(kind="toy", n=2):
    return TrainConfig(model=ModelConfig(kind=kind, path="unused"), context_parallel=n)


@pytest.mark.parametrize("value", [0, -2, 1.5, True])
def test_context_parallel_must_be_a_positive_int(value):
    with pytest.raises(ConfigError, match="context_parallel"):
        load_config(None, [f"context_parallel={value}"])


def test_context_parallel_must_divide_the_ranks(tmp_path):
    with pytest.raises(ConfigError, match=r"context_parallel \(2\) must divide the ranks \(3"):
        check_context_parallel(config(), world=3)
    # One process: refused before any weights load.
    with pytest.raises(ConfigError, match=r"context_parallel \(2\) must divide the ranks \(1"):
        Trainer(load_config(None, ["context_parallel=2", "loggers=[jsonl]"]), tmp_path / "run")


@pytest.mark.parametrize(
    "kind, name",
    [
        ("sd3", "SD3Transformer2DModel"),
        ("hunyuan_video", "HunyuanVideoTransformer3DModel"),
        ("mixture", "not a diffusers transformer"),
    ],
)
def test_a_family_without_a_plan_is_refused(kind, name):
    with pytest.raises(
        ConfigError, match=rf"model.kind={kind} \({name}\) has no context-parallel plan.*flux, toy, wan"
    ):
        check_context_parallel(config(kind), world=2)


def test_no_accelerator_is_refused(monkeypatch):
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match="context_parallel=2 needs an accelerator per rank.*has none"):
        check_context_parallel(config("wan"), world=4)
    check_context_parallel(config("wan", n=1), world=3)  # off: nothing to check


def test_heads_and_tokens_must_split_evenly():
    transformer = build_toy_model(seed=0)[0]  # 4 heads; patch (2, 4, 4)
    check_transformer(transformer, 4, (3, 8, 16, 16), text_tokens=7)  # 64 tokens; Wan does not split the text
    with pytest.raises(ConfigError, match=r"must divide the attention heads of WanTransformer3DModel \(4\)"):
        check_transformer(transformer, 3, (3, 8, 16, 16), text_tokens=6)
    with pytest.raises(ConfigError, match=r"\(2\) must divide the video tokens of one sample .* \(3;"):
        check_transformer(transformer, 2, (3, 2, 4, 12), text_tokens=6)


def test_flux_text_tokens_must_split_evenly():
    from diffusers import FluxTransformer2DModel

    flux = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4),
    )
    check_transformer(flux, 2, (4, 1, 8, 8), text_tokens=64)  # 16 image tokens
    with pytest.raises(ConfigError, match=r"text tokens \(model.max_sequence_length\) of one sample .* \(77;"):
        check_transformer(flux, 2, (4, 1, 8, 8), text_tokens=77)


def test_a_backbone_prm_sharing_the_policy_is_refused():
    transformer = build_toy_model(seed=0)[0]
    shared = SimpleNamespace(transformer=transformer)
    with pytest.raises(ConfigError, match="backbone PRM sharing the policy's transformer"):
        enable_context_parallel(
            RankLayout(2, 0, 1), [transformer], prm=shared, latent_shape=(3, 8, 16, 16), text_tokens=6
        )
