"""The backbone PRM of Wan2.2 A14B on the tiny random two-expert pipeline of test_models_wan22 (built offline):
collected, trained through the command line, each noisy state read by the expert the pipeline uses at its sigma,
its guidance gradient, and RL with the PRM sharing the LoRA policy's two frozen experts."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_models_wan22 import TEXT_DIM, overrides, wan22_dir  # noqa: F401  (wan22_dir is a fixture)

from euphonium import ops
from euphonium.prm import main as prm_main
from euphonium.prm_collect import load_shards
from euphonium.rewards.prm import BackbonePRM
from euphonium.train import load_config
from euphonium.train.__main__ import main as train_main
from euphonium.train.policy import build_policy

CONFIG = "wan2_2_t2v_a14b"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _overrides(root, **extra):
    values = {"model.dtype": "float32", "model.gradient_checkpointing": "false", "micro_batches": 1, **extra}
    return overrides(root, **values)


def test_backbone_prm_reads_each_sigma_with_its_expert_and_guides_rl(wan22_dir, tmp_path):  # noqa: F811
    data, prm_dir = tmp_path / "data", tmp_path / "prm"
    prm_main(
        ["collect", "--config", CONFIG, "--num-samples", "4", "--out", str(data), "--shard-size", "4"]
        + _overrides(wan22_dir)
    )
    train = ["train", "--config", CONFIG, "--data", str(data), "--kind", "backbone", "--lora-rank", "2"]
    prm_main(
        [
            *train,
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--held-out-fraction",
            "0.5",
            "--warmup-steps",
            "0",
            "--eval-every",
            "2",
            "--output-dir",
            str(prm_dir),
            *_overrides(wan22_dir),
        ]
    )
    settings = json.loads((prm_dir / "prm_kind.json").read_text())
    assert settings["base_class"] == "WanExperts" and settings["base_path"] == str(wan22_dir)
    adapter = load_file(str(prm_dir / "adapter.safetensors"))
    assert {k.split(".")[0] for k in adapter} == {"transformer", "transformer_2"}  # the PRM's adapter on both

    # The shipped euphonium algorithm with the PRM: it shares the policy's two experts (one frozen copy).
    guided = {"algorithm": "euphonium", "prm_path": str(prm_dir), "sampler.guidance_start": 2}
    rl = _overrides(wan22_dir, **guided)
    policy = build_policy(load_config(CONFIG, rl), torch.device("cpu"))
    prm = policy.prm
    assert isinstance(prm, BackbonePRM) and prm.transformer is policy.transformer
    assert set(prm.backbones) == {"transformer", "transformer_2"}

    # Sigma 0.95 (t = 950 >= 875) is the high-noise expert's, 0.3 the low-noise one's: a mixed batch scores as
    # each sample alone, and changing the low-noise expert's adapter changes the low-sigma score only.
    torch.manual_seed(0)
    x, sigma = torch.randn(2, *policy.latent_shape), torch.tensor([0.95, 0.3])
    emb = load_shards(data, tokens=True).prompt_embeds[:2]
    with torch.no_grad():
        r = prm(x, sigma, emb)
        torch.testing.assert_close(r, torch.cat([prm(x[:1], sigma[:1], emb[:1]), prm(x[1:], sigma[1:], emb[1:])]))
        for name, p in prm.adapter_parameters().items():
            if name.startswith("transformer_2."):
                p.add_(torch.randn_like(p))
        moved = prm(x, sigma, emb)
    assert moved[0] == r[0] and moved[1] != r[1]

    # The guidance gradient d r / d x through both experts.
    _, grad = ops.reward_grad(prm, x, sigma, emb)
    assert bool(torch.isfinite(grad).all()) and bool((grad[0].abs().max() > 0) & (grad[1].abs().max() > 0))

    # One RL step guided by it, the PRM refreshed on the step's rollouts two states at a time.
    out = tmp_path / "run"
    run = _overrides(wan22_dir, **guided, max_steps=1, prm_refresh_every=1, prm_refresh_batch_size=2)
    assert train_main(["--config", CONFIG, "--output-dir", str(out), *run]) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert "process_reward_mean" in row and row["prm/loss"] == row["prm/loss"]
    # The policy's checkpoint holds its own adapter only.
    saved = load_file(str(out / "checkpoints" / "step-1" / "trainable.safetensors"))
    assert saved and not any(".prm." in k for k in saved)
