"""The backbone PRM of SD3.5, FLUX.1 and HunyuanVideo on the tiny random pipelines of test_models_* (built
offline): collected with the policy's whole conditioning, trained and reported through the command line, called with the
policy's Conditioning (pooled projections, embedded guidance, attention mask) on the image / video tokens, its
guidance gradient, the LoRA policy's base shared, and one guided RL step with the PRM refreshed."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_models_flux import flux_dir  # noqa: F401  (fixtures)
from test_models_flux import overrides as flux_overrides
from test_models_hunyuan_video import hunyuan_dir  # noqa: F401
from test_models_hunyuan_video import overrides as hunyuan_overrides
from test_models_sd3 import overrides as sd3_overrides
from test_models_sd3 import sd3_dir  # noqa: F401

from euphonium import ops
from euphonium.models.diffusers import Conditioning
from euphonium.prm import main as prm_main
from euphonium.prm_collect import load_shards
from euphonium.rewards.prm import BackbonePRM
from euphonium.train import load_config
from euphonium.train.__main__ import main as train_main
from euphonium.train.policy import build_policy


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(config, family_overrides, root, tmp_path, *, base_class, kwargs, tokens):
    """Collect, train, call, differentiate and RL-train the backbone PRM of ``config`` on the pipeline ``root``:
    ``kwargs`` the Conditioning keys the transformer needs, ``tokens`` its image / video tokens per sample."""

    def args(**extra):
        values = {"model.dtype": "float32", "model.gradient_checkpointing": "false", "micro_batches": 1, **extra}
        return family_overrides(root, **values)

    data, prm_dir = tmp_path / "data", tmp_path / "prm"
    prm_main(["collect", "--config", config, "--num-samples", "4", "--out", str(data), "--shard-size", "4", *args()])
    train = ["train", "--config", config, "--data", str(data), "--kind", "backbone", "--lora-rank", "2"]
    steps = ["--steps", "2", "--batch-size", "2", "--held-out-fraction", "0.5", "--warmup-steps", "0"]
    prm_main([*train, *steps, "--eval-every", "2", "--output-dir", str(prm_dir), *args()])
    settings = json.loads((prm_dir / "prm_kind.json").read_text())
    assert settings["base_path"] == str(root / "transformer")
    adapter = load_file(str(prm_dir / "adapter.safetensors"))
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in adapter.items())  # B starts at 0: it trained
    report = tmp_path / "report"
    rep = ["report", "--config", config, "--prm", str(prm_dir), "--data", str(data), "--out", str(report)]
    prm_main([*rep, "--rhos", "0,2", "--guided-step", "1", "--guided-prompts", "2", "--batch-size", "2", *args()])
    rows = json.loads((report / "report.json").read_text())
    assert all(r["n"] == 4 for r in rows["calibration"]) and rows["win_rate"][0]["tie_rate"] == 1.0

    # The RL run's policy (LoRA on the same folder): the PRM holds the policy's own family adapter.
    guided = {"algorithm": "euphonium", "prm_path": str(prm_dir), "sampler.guidance_start": 2}
    policy = build_policy(load_config(config, args(**guided)), torch.device("cpu"))
    prm = policy.prm
    assert isinstance(prm, BackbonePRM) and prm.transformer is policy.transformer
    assert type(prm.backbones["transformer"]).__name__ == base_class and prm.conditioning == kwargs

    # The shards keep the policy's whole conditioning, exactly (prompt tokens and every kwarg).
    stored = load_shards(data, tokens=True)
    assert set(stored.cond_kwargs) == set(kwargs)
    again = policy.encode(stored.prompts)
    assert torch.equal(stored.prompt_embeds, again.prompt_embeds)
    assert all(torch.equal(stored.cond_kwargs[k], again.kwargs[k]) for k in kwargs)

    # A batch scores as each sample alone; only the image / video tokens are pooled; every kwarg reaches it
    # (through a head of O(1) weights: two steps from its zero start barely move the output).
    torch.manual_seed(0)
    with torch.no_grad():
        for p in prm.head.parameters():
            p.normal_(0, 0.5)
    x, sigma = torch.randn(2, *policy.latent_shape), torch.tensor([0.3, 0.8])
    cond = policy.encode(stored.prompts[:1] + stored.prompts[-1:])
    seen = []
    hook = prm.backbones["transformer"].norm_out.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    with torch.no_grad():
        r = prm(x, sigma, cond)
        alone = torch.cat([prm(x[i : i + 1], sigma[i : i + 1], cond.select([i])) for i in range(2)])
        torch.testing.assert_close(r, alone)
        for key in kwargs:  # the mask: attend to the padding too; the others doubled
            value = cond.kwargs[key]
            other = {**cond.kwargs, key: torch.ones_like(value) if key == "encoder_attention_mask" else value * 2}
            assert not torch.allclose(prm(x, sigma, Conditioning(cond.prompt_embeds, kwargs=other)), r), key
    hook.remove()
    assert set(seen) == {tokens}
    with pytest.raises(ValueError, match=kwargs[0]):
        prm(x, sigma, cond.prompt_embeds)  # the text alone is not the transformer's conditioning

    # The guidance gradient d r / d x, per sample.
    _, grad = ops.reward_grad(prm, x, sigma, cond)
    assert bool(torch.isfinite(grad).all()) and all(g.abs().max() > 0 for g in grad)

    # The trainer's LoRA ("default") goes on the same module: one base copy, nothing but adapters and head extra.
    from peft import LoraConfig

    policy.transformer.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))

    def base(module):
        return {p.data_ptr() for n, p in module.named_parameters() if "lora_" not in n}

    assert base(prm.backbones["transformer"]) == base(policy.transformer)
    assert {p.data_ptr() for p in prm.trainable_parameters()}.isdisjoint(base(policy.transformer))

    # One RL step guided by it, the PRM refreshed on the step's rollouts two states at a time.
    out = tmp_path / "run"
    run = args(**guided, max_steps=1, prm_refresh_every=1, prm_refresh_batch_size=2)
    assert train_main(["--config", config, "--output-dir", str(out), *run]) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert "process_reward_mean" in row and row["prm/loss"] == row["prm/loss"]
    saved = load_file(str(out / "checkpoints" / "step-1" / "trainable.safetensors"))
    assert saved and not any(".prm." in k for k in saved)


def test_backbone_prm_of_sd3(sd3_dir, tmp_path):  # noqa: F811
    # CFG on: the policy's negative half never reaches the PRM.
    kw = dict(base_class="SD3Transformer2DModel", kwargs=("pooled_projections",), tokens=16)
    _run("sd3_5_medium", sd3_overrides, sd3_dir, tmp_path, **kw)


def test_backbone_prm_of_flux(flux_dir, tmp_path):  # noqa: F811
    kw = dict(base_class="FluxTransformer2DModel", kwargs=("pooled_projections", "guidance"), tokens=16)
    _run("flux_1_dev", flux_overrides, flux_dir, tmp_path, **kw)


def test_backbone_prm_of_hunyuan_video(hunyuan_dir, tmp_path):  # noqa: F811
    kwargs = ("encoder_attention_mask", "pooled_projections", "guidance")
    kw = dict(base_class="HunyuanVideoTransformer3DModel", kwargs=kwargs, tokens=2)
    _run("hunyuan_video", hunyuan_overrides, hunyuan_dir, tmp_path, **kw)
