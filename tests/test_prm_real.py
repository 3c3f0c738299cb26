"""PRMs for a configured (non-toy) model: sharded collection with resume, the backbone PRM (frozen and LoRA),
the report, and RL training with it, on the tiny random Wan2.1 pipeline of test_train_wan (built offline)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_train_wan import TEXT_DIM, Z_DIM, wan_dir, wan_overrides  # noqa: F401  (wan_dir is a fixture)

from euphonium.prm import main as prm_main
from euphonium.prm_collect import load_shards, shard_path
from euphonium.rewards.prm import BackbonePRM, PRMTrainConfig, PRMTrainer, load_prm
from euphonium.train import load_config
from euphonium.train.__main__ import main as train_main
from euphonium.train.policy import build_policy


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _overrides(root, **extra):
    # The packaged Wan config, shrunk to the tiny pipeline by the same overrides as test_train_wan.
    return wan_overrides(root, **{"model.gradient_checkpointing": "false", **extra})


def _collect(root, out, *args, **extra):
    argv = ["collect", "--config", "wan2_1_t2v_1_3b", "--num-samples", "8", "--out", str(out), "--shard-size", "4"]
    return prm_main([*argv, *args, *_overrides(root, **extra)])


@pytest.fixture(scope="module")
def shards(wan_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("prm_data") / "data"
    # Module fixtures run before the autouse one-thread fixture: collect at one thread too, or the resume test's
    # recollection (one thread) can differ from these shards in the last bits (seen once under pytest -n 2).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _collect(wan_dir, out)
    finally:
        torch.set_num_threads(threads)
    return out


def test_collect_writes_resumable_shards_of_the_configured_model(wan_dir, shards, tmp_path, monkeypatch):  # noqa: F811
    manifest = json.loads((shards / "collect.json").read_text())
    assert manifest["model"]["kind"] == "wan" and manifest["num_samples"] == 8
    first = [load_file(str(shard_path(shards, k))) for k in (0, 1)]
    assert first[0]["x0"].shape == (4, Z_DIM, 3, 4, 4)
    assert first[0]["prompt_tokens"].shape[1:] == (8, TEXT_DIM)  # per-token: the backbone PRM's conditioning
    assert torch.equal(first[1]["sample_index"], torch.arange(4, 8))
    assert (first[0]["parts.jpeg_compressibility"] < 0).all()  # every named reward part kept
    data = load_shards(shards, tokens=True)
    assert data.prompt_embeds.shape == (8, 8, TEXT_DIM) and len(data.prompts) == 8
    assert load_shards(shards).prompt_embeds.shape == (8, TEXT_DIM)
    # Groups of group_size=2 share a prompt.
    assert data.prompts[0::2] == data.prompts[1::2]

    # Resume: a lost shard (and a half-written temporary) is collected again, identically; the other is kept.
    copy = tmp_path / "data"
    copy.mkdir()
    for name in ("collect.json", shard_path(shards, 0).name):
        (copy / name).write_bytes((shards / name).read_bytes())
    (copy / ".shard-000001.safetensors.123.tmp").write_bytes(b"torn")
    mtime = shard_path(copy, 0).stat().st_mtime_ns
    _collect(wan_dir, copy)
    assert shard_path(copy, 0).stat().st_mtime_ns == mtime
    again = load_file(str(shard_path(copy, 1)))
    assert set(again) == set(first[1]) and all(torch.equal(again[k], first[1][k]) for k in again)

    # Settings the data depends on must match (a training-only one may differ); others into the folder are refused.
    _collect(wan_dir, copy, **{"model.lora_rank": 4})
    with pytest.raises(ValueError, match="seed"):
        _collect(wan_dir, copy, "--seed", "3")
    with pytest.raises(ValueError, match="prompts"):
        _collect(wan_dir, copy, prompts=json.dumps(["a cat on a red boat"]))

    # Under torchrun rank r of W writes the shards k with k % W == r.
    import euphonium.train.distributed as distributed

    monkeypatch.setattr(distributed, "init_distributed", lambda: (1, 2, torch.device("cpu")))
    ranked = tmp_path / "ranked"
    _collect(wan_dir, ranked)
    assert sorted(p.name for p in ranked.glob("shard-*")) == [shard_path(ranked, 1).name]


def test_backbone_prm_trains_reports_and_guides_rl_with_shared_weights(wan_dir, shards, tmp_path):  # noqa: F811
    prm_dir = tmp_path / "prm"
    train = ["train", "--config", "wan2_1_t2v_1_3b", "--data", str(shards), "--kind", "backbone", "--lora-rank", "2"]
    common = ["--batch-size", "4", "--warmup-steps", "0", "--held-out-fraction", "0.25", *_overrides(wan_dir)]
    prm_main(
        [*train, "--steps", "3", "--eval-every", "3", "--output-dir", str(prm_dir), "--checkpoint-every", "2", *common]
    )
    trained = load_file(str(prm_dir / "adapter.safetensors"))
    # Resume from the step-2 checkpoint (head, adapter, optimiser, RNG): only step 3 again, to the same weights.
    resume = [*train, "--steps", "3", "--eval-every", "1", "--output-dir", str(prm_dir), "--resume", *common]
    prm_main(resume)
    steps = [json.loads(line)["step"] for line in (prm_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3]  # the resumed run evaluated step 3 only (a fresh start would log 1, 2, 3)
    resumed = load_file(str(prm_dir / "adapter.safetensors"))
    assert all(torch.equal(trained[k], resumed[k]) for k in trained)
    prm_main([*train[:-4], "--steps", "2", "--output-dir", str(tmp_path / "conv"), *common])
    assert json.loads((tmp_path / "conv" / "training.json").read_text())["kind"] == "conv"

    summary = json.loads((prm_dir / "training.json").read_text())
    assert summary["kind"] == "backbone" and summary["final"]["step"] == 3
    assert json.loads((prm_dir / "prm_kind.json").read_text())["kind"] == "backbone"
    prm = load_prm(prm_dir)
    assert isinstance(prm, BackbonePRM) and bool(prm.reward_stats_fitted)
    adapter = load_file(str(prm_dir / "adapter.safetensors"))
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in adapter.items())  # B starts at 0: it trained
    assert prm.head[-1].weight.abs().max() > 0  # zero-initialised: it trained

    # The PRM's call: [B] float32 from (x_sigma, sigma [B], per-token embeddings).
    data = load_shards(shards, tokens=True)
    x, emb = data.x0[:2].float(), data.prompt_embeds[:2]
    r = prm(x, torch.tensor([0.3, 0.3]), emb)
    assert r.shape == (2,) and r.dtype == torch.float32
    with pytest.raises(ValueError, match="per-token"):
        prm(x, torch.tensor([0.3, 0.3]), emb.mean(1))

    report = tmp_path / "report"
    argv = ["report", "--config", "wan2_1_t2v_1_3b", "--prm", str(prm_dir), "--data", str(shards), "--out"]
    prm_main([*argv, str(report), "--rhos", "0,2", "--guided-prompts", "4", "--batch-size", "4", *_overrides(wan_dir)])
    rep = json.loads((report / "report.json").read_text())
    assert [(r["sigma_lo"], r["sigma_hi"]) for r in rep["calibration"]][0] == (0.0, 0.1)
    assert all(r["n"] == 8 and r["calibration_error"] >= 0 for r in rep["calibration"])
    zero, two = rep["win_rate"]
    assert zero["tie_rate"] == 1.0  # rho = 0: the same rollout (same seed, no shift)
    assert two["tie_rate"] < 1.0 and two["n"] == 4  # a real shift changed the outcomes
    assert "calibration error" in (report / "report.md").read_text()

    # RL with the backbone PRM: the policy's LoRA and the PRM's share one base copy; online refresh runs.
    out = tmp_path / "run"
    # The shipped config's memory setting: gradient checkpointing (the PRM's own calls go through it too).
    overrides = _overrides(
        wan_dir,
        algorithm="euphonium",
        prm_path=str(prm_dir),
        prm_refresh_every=1,
        **{"model.gradient_checkpointing": "true"},
    )
    assert train_main(["--output-dir", str(out), *overrides]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all("process_reward_mean" in r and r["prm/loss"] == r["prm/loss"] for r in rows)
    # The policy's checkpoint holds its own adapter only.
    assert not any(".prm." in k for k in load_file(str(out / "checkpoints" / "step-2" / "trainable.safetensors")))


def test_backbone_prm_shares_the_lora_policy_base_and_switches_adapters(wan_dir, tmp_path):  # noqa: F811
    from peft import LoraConfig

    prm_dir = tmp_path / "prm"
    base = wan_dir / "pipeline" / "transformer"
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    own = BackbonePRM(WanTransformer3DModel.from_pretrained(base), base_path=base, lora_rank=2)
    with torch.no_grad():
        for p in own.trainable_parameters():
            p.normal_(0, 0.5)  # a trained-looking adapter and head
    own.set_reward_stats(0.5, 2.0)
    own.save_pretrained(prm_dir)

    config = load_config("wan2_1_t2v_1_3b", _overrides(wan_dir, prm_path=str(prm_dir), algorithm="euphonium"))
    policy = build_policy(config, torch.device("cpu"))
    prm = policy.prm
    assert prm.transformer is policy.transformer
    # What the trainer does next: the policy's own LoRA ("default"), here with a non-zero B.
    policy.transformer.requires_grad_(False)
    policy.transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for n, p in policy.transformer.named_parameters():
            if ".default." in n:
                p.normal_(0, 0.5)
    trainable = {n for n, p in policy.transformer.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)

    # One base copy: every base weight's storage is shared, nothing but adapters and the head is extra.
    def base_storages(module):
        return {p.data_ptr() for n, p in module.named_parameters() if "lora_" not in n}

    assert base_storages(prm.transformer) == base_storages(policy.transformer)
    assert {p.data_ptr() for p in prm.trainable_parameters()}.isdisjoint(base_storages(policy.transformer))

    # The PRM sees its own adapter (same output as its separately loaded copy), the policy its own afterwards.
    torch.manual_seed(1)
    x, sigma, emb = torch.randn(2, *policy.latent_shape), torch.tensor([0.4, 0.8]), torch.randn(2, 8, TEXT_DIM)
    separate = load_prm(prm_dir, dtype=policy.transformer.dtype)
    assert separate.transformer is not policy.transformer
    t, dtype = sigma * 1000, policy.transformer.dtype
    before = policy.transformer(x.to(dtype), t, emb.to(dtype), return_dict=False)[0]
    r = prm(x, sigma, emb)
    torch.testing.assert_close(r, separate(x, sigma, emb))
    # Noise-conditioned through the timestep input, text-conditioned through cross-attention, per sample.
    assert not torch.allclose(r, prm(x, sigma.flip(0), emb)) and not torch.allclose(r, prm(x, sigma, emb.flip(0)))
    torch.testing.assert_close(prm(x[:1], sigma[:1], emb[:1]), r[:1])
    # The guidance gradient under the policy's gradient checkpointing: blocks recomputed in backward see the PRM's
    # adapter, not the policy's (the same gradient as the separate copy's, which does not checkpoint).
    from euphonium import ops

    policy.transformer.enable_gradient_checkpointing()
    policy.transformer.train()
    _, grad = ops.reward_grad(prm, x, sigma, emb)
    _, expected = ops.reward_grad(separate, x, sigma, emb)
    assert grad.abs().max() > 0
    torch.testing.assert_close(grad, expected)
    after = policy.transformer(x.to(dtype), t, emb.to(dtype), return_dict=False)[0]
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert {n for n, p in policy.transformer.named_parameters() if p.requires_grad} == trainable

    # Online refresh trains the PRM's head and adapter only, never the base or the policy's adapter.
    snapshot = {n: p.detach().clone() for n, p in policy.transformer.named_parameters()}
    trainer = PRMTrainer(prm, PRMTrainConfig(batch_size=2, online_steps=2, online_lr=1e-2))
    stats = trainer.update(torch.randn(2, *policy.latent_shape), emb, torch.tensor([0.0, 1.0]))
    assert stats["prm/buffer_size"] == 2
    changed = {n for n, p in policy.transformer.named_parameters() if not torch.equal(p, snapshot[n])}
    assert changed and all(".prm." in n for n in changed)


def test_win_rate_guides_the_step_under_a_random_sde_window():
    """euphonium_fast draws its SDE window per rollout: the measure fixes it at the guided step, so a shift acts."""
    from euphonium.prm_collect import build_reward_set, collection_config, guided_step_win_rate
    from euphonium.toy.prm import load_toy_prm

    config = load_config("toy", ["algorithm=euphonium_fast"])
    device = torch.device("cpu")
    policy = build_policy(collection_config(config), device)
    rows = guided_step_win_rate(
        config, policy, load_toy_prm(), build_reward_set(config, device), policy.prompts[:8], (0.0, 4.0), seed=2
    )
    assert [r["step"] for r in rows] == [0, 0]
    # Seed 2's window would start after step 0 (every pair a tie, without the fix); every rollout is guided here.
    assert rows[0]["tie_rate"] == 1.0 and rows[1]["tie_rate"] == 0.0
