"""euphonium.train on the toy world: config errors, a short run's outputs, resume, NaN recovery."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from euphonium.presets import GUIDED_ALGORITHMS, OBJECTIVE_PRESETS
from euphonium.rewards.prm import LatentRewardModel
from euphonium.sampler import preset
from euphonium.toy import build_toy_model, save_toy_model
from euphonium.train import ConfigError, Trainer, load_config
from euphonium.train import trainer as trainer_module
from euphonium.train.__main__ import main
from euphonium.train.config import ALGORITHMS

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


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    """A random toy model and PRM (fast to load; the committed ones are tested elsewhere)."""
    root = tmp_path_factory.mktemp("assets")
    transformer, text_encoder = build_toy_model(seed=int(torch.randint(0, 2**31, ())))
    save_toy_model(transformer, text_encoder, root / "toy")
    LatentRewardModel(in_channels=3, text_dim=text_encoder.config.dim).save_pretrained(root / "prm")
    return root


def tiny_overrides(assets, **extra):
    values = {
        "model.path": str(assets / "toy"),
        "prm_path": str(assets / "prm"),
        "prompts_per_step": 2,
        "group_size": 2,
        "sampler.num_steps": 4,
        "sampler.guidance_start": 2,
        "max_steps": 2,
        "checkpoint_every": 1,
        "num_eval_samples": 2,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def test_defaults_are_the_toy_euphonium_fast_run():
    config = load_config()
    assert config.algorithm == "euphonium_fast" and config.model.kind == "toy" and config.group_size >= 2
    assert load_config(str(Path(__file__).parents[1] / "euphonium/configs/toy.yaml")).to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "override, message",
    [
        ("grup_size=4", "unknown config key 'grup_size'"),
        ("model.pth=/x", "unknown config key 'model.pth'"),
        ("lr=fast", "lr must be of type float"),
        ("max_steps=1.5", "max_steps must be of type int"),
        ("group_size=1", "group_size must be >= 2"),
        ("algorithm=ppo", "algorithm must be one of"),
        ("model.kind=wan", "model.path is required"),
        ("timestep_fraction=0", "timestep_fraction must be in (0, 1]"),
        ("prm_refresh_batch_size=1", "prm_refresh_batch_size must be >= 2"),
        ("noequals", "must look like key=value"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("]", r"\]")):
        load_config(None, [override])


def test_overrides_into_a_mapping_update_one_key():
    default = load_config()
    config = load_config(None, ["reward_weights.direction=2", "sampler.num_steps=6", "sampler.noise_level=0.5"])
    assert config.reward_weights == {**default.reward_weights, "direction": 2.0}
    assert config.sampler == {**default.sampler, "num_steps": 6, "noise_level": 0.5}
    assert load_config(None, ["reward_weights={combined: 1}"]).reward_weights == {"combined": 1.0}
    with pytest.raises(ConfigError, match="lr is a float, not a mapping"):
        load_config(None, ["lr.x=1"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("reward_weights={combined: 1}", "have no weight"),
        ("rewards={nosuch: {}}", "unknown reward 'nosuch'"),
        ("reward_weights.colour=1", "unknown rewards \\['colour'\\]"),
        ("prompts=[a purple cow]", "prompts: prompt 'a purple cow' does not follow the toy grammar"),
    ],
)
def test_reward_and_prompt_errors_come_before_the_model_loads(tmp_path, override, message):
    # The model path does not exist: the reward/prompt error must be raised before anything loads it.
    config = load_config(None, ["model.path=/nonexistent", override])
    with pytest.raises(ConfigError, match=message):
        Trainer(config, tmp_path / "run")


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "euphonium-run.json").write_text("{}\n")  # a run's folder (the marker)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert main(["--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: output dir") and "--resume" in err and "\n" not in err
    assert main(["--output-dir", str(tmp_path / "new"), "sampler.nosuchfield=1"]) == 2
    assert "sampler" in capsys.readouterr().err


def test_short_run_writes_metrics_checkpoints_and_samples(tiny_assets, tmp_path):
    out = tmp_path / "run"
    assert main(["--output-dir", str(out), *tiny_overrides(tiny_assets, eval_every=1, eval_prompts=3)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert set(REQUIRED) <= set(row)
        assert {f"reward/{p}" for p in TOY_PARTS} <= set(row)
        assert row["world_size"] == 1 and row["ratio_max_dev"] < 1e-3
        assert all(v == v for v in row.values() if isinstance(v, float))  # no NaN
    assert "process_reward_mean" in rows[0]  # Euphonium: guided steps scored by the PRM
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-1", "step-2"]
    for name in ("trainable.safetensors", "optim.pt", "rng.pt", "config.json", "state.json"):
        assert (out / "checkpoints" / "step-2" / name).is_file()
    for name in ("reward_curve.png", "samples.gif", "samples.png", "config.json"):
        assert (out / name).is_file()
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals] == [0, 1, 2]  # before training, then every step
    for row in evals:
        assert {"reward_mean", *(f"reward/{p}" for p in TOY_PARTS)} <= set(row)
        assert all(0 <= v <= 1 for k, v in row.items() if k != "step")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_trains_with_its_preset(tiny_assets, tmp_path, algorithm):
    # The published Euphonium preset guides its last steps, euphonium_fast the window's (first half).
    start = 3 if algorithm == "euphonium" else 0
    config = load_config(
        None,
        tiny_overrides(
            tiny_assets, algorithm=algorithm, max_steps=1, **{"sampler.num_steps": 6, "sampler.guidance_start": start}
        ),
    )
    trainer = Trainer(config, tmp_path / algorithm)
    assert trainer.sampler.schedule == preset(algorithm).schedule
    guided = algorithm in GUIDED_ALGORITHMS
    needs_prm = guided or OBJECTIVE_PRESETS[algorithm]["process_advantage"] != "none"
    assert (trainer.policy.prm is not None) == needs_prm and trainer.sampler.guidance == guided
    metrics = trainer.train_step()
    assert ("process_reward_mean" in metrics) == needs_prm and metrics["ratio_max_dev"] < 1e-3
    assert ("guidance/rho" in metrics) == guided


def test_windowed_sampler_run_evaluates_and_samples(tiny_assets, tmp_path):
    """Flow-GRPO-Fast's random SDE window: training, the fixed-set evaluation and the final ODE samples."""
    out = tmp_path / "run"
    overrides = tiny_overrides(
        tiny_assets,
        algorithm="flow_grpo",
        max_steps=1,
        eval_every=1,
        eval_prompts=2,
        **{"sampler.schedule": "cps", "sampler.sde_window_size": 2, "sampler.sde_window_range": "[0,3]"},
    )
    assert main(["--output-dir", str(out), *overrides]) == 0
    assert len((out / "eval.jsonl").read_text().splitlines()) == 2 and (out / "samples.gif").is_file()


def test_every_option_path_trains(tiny_assets, tmp_path):
    """Distillation, online PRM refresh, PPO epochs, micro-batches, global-std advantages and LoRA in one step."""
    config = load_config(
        None,
        tiny_overrides(
            tiny_assets,
            max_steps=1,
            distill_coef=1.0,
            prm_refresh_every=1,
            inner_epochs=2,
            micro_batches=2,
            adv_global_std=True,
            **{"model.lora_rank": 2, "sampler.guidance_lambda": 100.0},
        ),
    )
    trainer = Trainer(config, tmp_path / "run")
    before = {k: v.clone() for k, v in trainer._trainable_state().items()}
    assert all("lora" in name for name in before)
    metrics = trainer.train_step()
    assert {"prm/loss", "process_reward_mean", "loss", "grad_norm"} <= set(metrics)
    assert all(v == v for v in metrics.values() if isinstance(v, float))
    after = trainer._trainable_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # The adapter's initialisation follows the run's seed, whatever the global RNG holds.
    torch.manual_seed(int(torch.randint(0, 2**31, ())) + 1)
    again = Trainer(config, tmp_path / "again")._trainable_state()
    assert all(torch.equal(before[k], again[k]) for k in before)
    config.seed += 1
    other = Trainer(config, tmp_path / "other")._trainable_state()
    assert any(not torch.equal(before[k], other[k]) for k in before)


def test_prm_refresh_batch_size_bounds_each_refresh_step(tiny_assets, tmp_path, monkeypatch):
    """``prm_refresh_batch_size``: every refresh optimiser step trains on that many rollout states, not on the whole
    step's batch at once (what a big backbone PRM could not hold)."""
    import euphonium.rewards.prm.trainer as prm_trainer

    sizes, loss = [], prm_trainer.prm_loss

    def recorded(model, x0, *args, **kwargs):
        sizes.append(len(x0))
        return loss(model, x0, *args, **kwargs)

    monkeypatch.setattr(prm_trainer, "prm_loss", recorded)
    overrides = tiny_overrides(tiny_assets, max_steps=1, prm_refresh_every=1, prompts_per_step=3)
    for batch, want in ((None, 6), (2, 2)):
        sizes.clear()
        extra = [] if batch is None else [f"prm_refresh_batch_size={batch}"]
        trainer = Trainer(load_config(None, overrides + extra), tmp_path / f"run{batch}")
        assert "prm/loss" in trainer.train_step()
        assert sizes == [want] * trainer.prm_trainer.config.online_steps


def test_resume_gives_the_same_weights(tiny_assets, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["kl_coef=0.01", "ema_decay=0.9", "eval_every=2", "eval_prompts=3"]
    assert main(["--output-dir", str(straight), *tiny_overrides(tiny_assets, max_steps=4), *common]) == 0
    assert main(["--output-dir", str(resumed), *tiny_overrides(tiny_assets, max_steps=2), *common]) == 0
    assert main(["--output-dir", str(resumed), "--resume", *tiny_overrides(tiny_assets, max_steps=4), *common]) == 0
    a = load_file(str(straight / "checkpoints" / "step-4" / "trainable.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step-4" / "trainable.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    first = load_file(str(straight / "checkpoints" / "step-3" / "trainable.safetensors"))
    assert any(not torch.equal(a[k], first[k]) for k in a)  # the weights do move
    ema_a = load_file(str(straight / "checkpoints" / "step-4" / "ema.safetensors"))
    ema_b = load_file(str(resumed / "checkpoints" / "step-4" / "ema.safetensors"))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    # The evaluation set is sampled from the same noise every time: equal weights, equal scores.
    evals_a = [json.loads(line) for line in (straight / "eval.jsonl").read_text().splitlines()]
    evals_b = [json.loads(line) for line in (resumed / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals_a] == [r["step"] for r in evals_b] == [0, 2, 4]
    assert evals_a == evals_b
    assert evals_a[0]["reward_mean"] != evals_a[2]["reward_mean"]  # and they follow the weights


def test_resume_redoes_the_steps_after_the_checkpoint_once(tiny_assets, tmp_path):
    """A run that logged steps past its last checkpoint (a crash) drops those rows when resumed."""
    out = tmp_path / "run"
    common = tiny_overrides(tiny_assets, eval_every=1, eval_prompts=2, checkpoint_every=2, keep_checkpoints=5)
    assert main(["--output-dir", str(out), *common, "max_steps=3"]) == 0
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-3")  # as if the run died after logging step 3
    assert main(["--output-dir", str(out), "--resume", *common, "max_steps=4"]) == 0
    steps = lambda name: [json.loads(line)["step"] for line in (out / f"{name}.jsonl").read_text().splitlines()]  # noqa: E731
    assert steps("metrics") == [1, 2, 3, 4] and steps("eval") == [0, 1, 2, 3, 4]


def test_resume_without_ema_starts_it_at_the_resumed_weights(tiny_assets, tmp_path):
    out = tmp_path / "run"
    assert main(["--output-dir", str(out), *tiny_overrides(tiny_assets, max_steps=2, ema_decay="null")]) == 0
    assert not (out / "checkpoints" / "step-2" / "ema.safetensors").exists()
    with pytest.warns(UserWarning, match="differ from the checkpoint's config.json: ema_decay"):
        assert (
            main(["--output-dir", str(out), "--resume", *tiny_overrides(tiny_assets, max_steps=3, ema_decay=0.9)]) == 0
        )
    before = load_file(str(out / "checkpoints" / "step-2" / "trainable.safetensors"))
    after = load_file(str(out / "checkpoints" / "step-3" / "trainable.safetensors"))
    ema = load_file(str(out / "checkpoints" / "step-3" / "ema.safetensors"))
    for name in ema:
        torch.testing.assert_close(ema[name], torch.lerp(before[name], after[name], 0.1))


def test_non_finite_updates_are_skipped_then_abort_keeping_the_checkpoint(tiny_assets, tmp_path, monkeypatch):
    config = load_config(None, tiny_overrides(tiny_assets, max_steps=6, max_bad_steps=2, keep_checkpoints=5))
    trainer = Trainer(config, tmp_path / "run")
    original = trainer_module.ops.dual_reward_loss

    def poisoned(*args, **kwargs):
        loss, stats = original(*args, **kwargs)
        return (loss * float("nan") if trainer.step >= 2 else loss), stats

    monkeypatch.setattr(trainer_module.ops, "dual_reward_loss", poisoned)
    with (
        pytest.warns(UserWarning, match="update skipped"),
        pytest.raises(RuntimeError, match="non-finite updates in a row"),
    ):
        trainer.train()
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints[-1] == "step-3"  # step 3 skipped its update (weights of step 2) and was saved
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step-3" / "trainable.safetensors"))
    step2 = load_file(str(tmp_path / "run" / "checkpoints" / "step-2" / "trainable.safetensors"))
    assert all(torch.isfinite(v).all() and torch.equal(v, step2[k]) for k, v in saved.items())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [0.0, 0.0, 1.0]
