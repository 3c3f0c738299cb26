"""The method's objective in the trainer: TD process credit, the guided mean, distillation targets,
several updates per batch, the last step never trained, algorithms as bundles, groups across ranks."""

import json

import pytest
import torch

from euphonium import ops
from euphonium.sampler import preset
from euphonium.train import ConfigError, Trainer, load_config, objective
from euphonium.train.__main__ import main
from euphonium.train.distributed import check_groups_fit_ranks
from tests.test_train import tiny_assets, tiny_overrides  # noqa: F401 (the fixture)


def _trainer(tiny_assets, tmp_path, **extra):  # noqa: F811
    config = load_config(None, tiny_overrides(tiny_assets, max_steps=1, **extra))
    return Trainer(config, tmp_path / "run")


def _record_updates(trainer):
    """Wrap the trainer's optimizer update to keep each update's statistics."""
    updates, inner = [], trainer._optimizer_update

    def wrapped(*args, **kwargs):
        stats, grad_norm = inner(*args, **kwargs)
        updates.append(stats)
        return stats, grad_norm

    trainer._optimizer_update = wrapped
    return updates


def test_second_update_moves_the_ratio_and_the_clip_acts(tiny_assets, tmp_path):  # noqa: F811
    trainer = _trainer(tiny_assets, tmp_path, updates_per_step=2, clip_range=1e-5, lr=1e-3, lr_warmup_steps=0)
    updates = _record_updates(trainer)
    metrics = trainer.train_step()
    assert len(updates) == 2
    # On-policy: the ratio is 1 up to the CPU matmul's batch-size-dependent last bit (the first update's
    # minibatch is half the rollout batch), far inside the clip range; the second update moves off it.
    assert updates[0]["ratio_max_dev"] < 1e-6 and updates[0]["clip_frac"] == 0.0
    assert updates[1]["ratio_max_dev"] > 1e-5 and updates[1]["clip_frac"] > 0.0
    assert metrics["ratio_max_dev"] == updates[0]["ratio_max_dev"] and metrics["clip_frac"] > 0.0
    # Warm-up and the scheduler count optimizer updates, logs count steps.
    assert trainer.scheduler.last_epoch == 2 and metrics["step"] == 1


def test_the_last_step_is_never_trained(tiny_assets, tmp_path):  # noqa: F811
    # dance_grpo records every step, the last one included; its noise cannot reach the decoded sample.
    trainer = _trainer(tiny_assets, tmp_path, algorithm="dance_grpo", timestep_fraction=1.0)
    trained, inner = [], trainer._step_loss

    def spy(traj, cond, rows, cols, *rest):
        trained.extend(traj.sde_steps[cols].tolist())
        return inner(traj, cond, rows, cols, *rest)

    trainer._step_loss = spy
    trainer.train_step()
    assert sorted(set(trained)) == [0, 1, 2]  # 4 steps: 0-2 trained, never 3


def test_td_process_advantages_are_group_normalised_score_changes(tiny_assets, tmp_path):  # noqa: F811
    trainer = _trainer(tiny_assets, tmp_path, algorithm="td_fast", **{"sampler.num_steps": 6})
    assert trainer.config.process_advantage == "td" and trainer.policy.prm is not None
    prompts, group_ids = trainer._sample_prompts()
    traj, _ = trainer._rollout(prompts)
    with torch.no_grad():
        rewards = trainer.rewards(trainer.policy.decode(traj.x0), prompts)
    _, process = objective.advantages(
        trainer.config, trainer.outcome_weights, rewards, traj, group_ids, distributed=False
    )
    n = int(traj.trainable.sum())
    scores = torch.cat([traj.process_reward[:, :n], rewards.total[:, None]], dim=1).double()
    diffs = scores[:, 1:] - scores[:, :-1]
    want = ops.group_advantages(diffs, group_ids=group_ids, eps=trainer.config.adv_eps)
    # The trainer takes the differences and their group statistics in float32: an error of a few ulps of
    # the scores, which the normalisation divides by the group's std of each step's differences (tiny
    # when a group's scores nearly agree).
    std = torch.stack([diffs[group_ids == g].std(0, unbiased=False) for g in group_ids.tolist()])
    ulp = torch.finfo(torch.float32).eps * scores.abs().max()
    bound = 1e-6 + 1e-5 * want.abs() + 32 * ulp / (std + trainer.config.adv_eps)
    assert bool(((process[:, :n].double() - want).abs() <= bound).all()), (process[:, :n], want, bound)
    assert not bool(process[:, n:].any()) and bool(process.any())


def test_distillation_targets(tiny_assets, tmp_path):  # noqa: F811
    # rho guidance: every guided shift has norm rho * std, so toward the policy's own guided mean the loss
    # is exactly rho^2 / (2 N) per sample (N elements); toward the reference it is that only while the
    # policy equals the reference.
    common = dict(algorithm="euphonium_fast", distill_coef=1.0, **{"sampler.guidance_rho": 0.8})
    losses = {}
    for target in ("policy", "reference"):
        trainer = _trainer(tiny_assets, tmp_path / target, distill_target=target, **common)
        assert (trainer.reference is not None) == (target == "reference")
        losses[target] = trainer.train_step()["distill_loss"]
        numel = torch.Size(trainer.policy.latent_shape).numel()
        assert losses[target] == pytest.approx(0.8**2 / (2 * numel), rel=1e-3)
        with torch.no_grad():  # move the policy away from the reference
            for p in trainer.params:
                p.add_(0.05 * torch.randn_like(p))
        trainer.step = 0  # the same rollout again
        losses[target + " moved"] = trainer.train_step()["distill_loss"]
    assert losses["policy moved"] == pytest.approx(0.8**2 / (2 * numel), rel=1e-3)
    assert losses["reference moved"] != pytest.approx(losses["policy moved"], rel=1e-2)


def test_algorithms_are_bundles_and_the_config_says_where_values_came_from(tiny_assets, tmp_path):  # noqa: F811
    out = tmp_path / "td"
    assert main(["--output-dir", str(out), *tiny_overrides(tiny_assets, algorithm="td_fast", max_steps=1)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["process_advantage"] == "td" and saved["updates_per_step"] == 1
    assert saved["from_algorithm"] == {"process_advantage": "td_fast", "updates_per_step": "td_fast"}
    assert saved["resolved_sampler"]["same_initial_noise"] is True
    # What the config sets wins, and is not reported as the algorithm's.
    config = load_config(None, tiny_overrides(tiny_assets, algorithm="td_fast", process_advantage="none"))
    assert config.process_advantage == "none" and config.from_algorithm == {"updates_per_step": "td_fast"}
    assert not config.needs_prm
    published = load_config(None, tiny_overrides(tiny_assets, algorithm="euphonium"))
    assert published.process_advantage == "state" and published.updates_per_step == 2
    with pytest.raises(ConfigError, match="process_advantage"):
        load_config(None, ["process_advantage=td2"])


def test_a_group_may_span_ranks_only_when_its_members_share_nothing(tiny_assets):  # noqa: F811
    check_groups_fit_ranks(4, 2, preset("euphonium_fast"))  # whole groups per rank
    check_groups_fit_ranks(3, 2, preset("flow_grpo"))  # independent noise, fixed window: fine
    for name in ("euphonium_fast", "dance_grpo", "flow_grpo_fast"):
        with pytest.raises(ConfigError, match="spans ranks"):
            check_groups_fit_ranks(3, 2, preset(name))


def test_the_mixture_config_trains_and_its_oracle_is_selectable(tmp_path):
    out = tmp_path / "mixture"
    args = ["--config", "mixture", "--output-dir", str(out), "max_steps=30", "eval_every=30", "eval_prompts=64"]
    assert main([*args, "prm_path=oracle"]) == 0
    evals = [json.loads(line)["reward_mean"] for line in (out / "eval.jsonl").read_text().splitlines()]
    assert evals[0] < 0.45 and evals[-1] > evals[0] + 0.05
    trainer = Trainer(load_config("mixture", ["max_steps=1", "prm_path=oracle"]), tmp_path / "oracle")
    assert type(trainer.policy.prm).__name__ == "MixtureOraclePRM"
    with pytest.warns(UserWarning, match="proxy"):
        toy = Trainer(load_config(None, ["prm_path=oracle", "max_steps=1"]), tmp_path / "toy")
    assert type(toy.policy.prm).__name__ == "ToyOraclePRM"


def test_eval_rewards_are_scored_by_the_evaluation_only(tiny_assets, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    extra = ["eval_every=1", "eval_prompts=2", "eval_rewards={jpeg_compressibility: {}}"]
    assert main(["--output-dir", str(out), *tiny_overrides(tiny_assets, max_steps=1), *extra]) == 0
    rows = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert all("reward/eval_only/jpeg_compressibility" in row for row in rows)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not any(key.startswith("reward/eval_only") for row in metrics for key in row)
    with pytest.raises(ConfigError, match="eval_rewards"):
        Trainer(load_config(None, tiny_overrides(tiny_assets, eval_rewards="{nope: {}}")), tmp_path / "bad")
