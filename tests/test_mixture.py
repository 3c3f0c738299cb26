"""The analytic mixture world: exact rewards and oracle PRM, the committed base model, a short RL run."""

import math

import pytest
import torch

from euphonium import ops
from euphonium.models.diffusers import Conditioning, DiffusersFlowModel
from euphonium.rewards import RewardSet, check_videos
from euphonium.sampler import preset, rollout
from euphonium.toy.mixture import (
    MixtureFlowModel,
    MixtureOraclePRM,
    MixturePretrainConfig,
    MixtureWorld,
    MixtureWorldConfig,
    build_mixture_model,
    build_mixture_world,
    default_world,
    latents_to_video,
    load_mixture_model,
    measure_base_rates,
    mixture_reward_fn,
    mixture_reward_set,
    oracle_calibration,
    pretrain_mixture_model,
    video_to_latents,
)
from euphonium.toy.mixture.grpo import MixtureGRPOConfig, mixture_grpo


@pytest.fixture(scope="module")
def world() -> MixtureWorld:
    return default_world()


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reference_rewards(world: MixtureWorld, x0: torch.Tensor, p: int) -> torch.Tensor:
    """``combined`` from the definition (posterior of the sigma = 0 mixture), written independently of the world's."""
    means = world.means[p].reshape(-1, world.dim)
    stds = world.stds[p].reshape(-1)
    logp = world.log_weights[p].reshape(-1) - ((x0[:, None] - means) ** 2).sum(-1) / (2 * stds**2)
    post = torch.softmax(logp - world.dim * torch.log(stds), dim=1).view(
        -1, world.config.num_modes, world.config.num_subclusters
    )
    return 0.5 * (post[:, 0].sum(-1) + post[:, 0, 0])


# --- the world -----------------------------------------------------------------------------------------


def test_world_is_deterministic_and_mis_weighted(world):
    again = MixtureWorld(MixtureWorldConfig(seed=0))
    assert torch.equal(again.means, world.means) and torch.equal(again.weights, world.weights)
    assert torch.equal(again.embeddings, world.embeddings)
    assert not torch.equal(MixtureWorld(MixtureWorldConfig(seed=1)).means, world.means)
    assert build_mixture_world(0) is build_mixture_world(0)
    c = world.config
    assert 16 <= c.num_prompts <= 32 and 16 <= c.dim <= 32 and c.num_modes >= 4
    torch.testing.assert_close(world.weights.sum(dim=(1, 2)), torch.ones(c.num_prompts, dtype=torch.float64))
    mode = world.weights[:, 0].sum(-1)
    sub = world.weights[:, 0, 0] / mode
    assert bool(((mode >= 0.2) & (mode <= 0.3)).all()) and bool(((sub >= 0.25) & (sub <= 0.35)).all())
    rates = world.base_rates()
    assert rates["mode"] == pytest.approx(float(mode.mean())) and rates["component"] == pytest.approx(
        float(world.weights[:, 0, 0].mean())
    )
    # Modes are R sqrt(2) apart, sub-clusters 2 delta.
    d = world.means[:, :, 0] - world.means[:, :, 1]
    torch.testing.assert_close(d.norm(dim=-1), torch.full(d.shape[:2], 2 * c.sub_offset, dtype=torch.float64))
    centres = world.means.mean(dim=2)
    gap = (centres[:, 0] - centres[:, 1]).norm(dim=-1)
    torch.testing.assert_close(gap, torch.full_like(gap, c.mode_radius * math.sqrt(2)))
    with pytest.raises(ValueError, match="dim"):
        MixtureWorldConfig(dim=25)


def test_prompts_and_embeddings(world):
    assert world.prompts[7] == "mixture 7"
    assert world.prompt_index(["mixture 3", " mixture 15 "]).tolist() == [3, 15]
    for bad in ("mixture 16", "mixture", "a red square moving left", "mixture -1"):
        with pytest.raises(ValueError, match="not a prompt"):
            world.prompt_index([bad])
    embeds = world.encode(["mixture 2", "", "mixture 9"])
    assert embeds.shape == (3, 1, world.config.embed_dim) and embeds.dtype == torch.float32
    assert bool((embeds[1] == 0).all())
    assert world.prompt_index_of_embeds(embeds[[0, 2]]).tolist() == [2, 9]
    assert world.prompt_index_of_embeds(embeds[[0, 2], 0]).tolist() == [2, 9]  # pooled [B, E]
    with pytest.raises(ValueError, match="none of the world's prompts"):
        world.prompt_index_of_embeds(embeds)


def test_video_round_trip_and_reward_interface(world):
    index = torch.arange(world.num_prompts).repeat(4)
    x0 = world.sample(index, 0)[0]
    latents = x0.float().view(-1, *world.latent_shape)
    video = latents_to_video(latents)
    assert video.shape == (len(index), *world.video_shape) and video.dtype == torch.float32
    assert check_videos(video, [world.prompts[i] for i in index]) == len(index)
    torch.testing.assert_close(video_to_latents(video), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(video_to_latents(latents_to_video(x0)), x0, atol=1e-12, rtol=0)
    prompts = [world.prompts[i] for i in index]
    out = RewardSet({"mixture": mixture_reward_fn()}, weights={"combined": 1.0, "mode": 0.0, "component": 0.0})(
        video, prompts
    )
    assert set(out.parts) == {"combined", "mode", "component"}
    torch.testing.assert_close(out.total, 0.5 * (out.parts["mode"] + out.parts["component"]))
    torch.testing.assert_close(
        out.total.double(),
        torch.cat([_reference_rewards(world, x0[i : i + 1], int(p)) for i, p in enumerate(index)]),
        atol=1e-5,
        rtol=0,
    )
    # The trainer probes its rewards with a blank video: finite values.
    blank = mixture_reward_set()(torch.zeros(2, *world.video_shape), prompts[:2])
    assert bool(torch.isfinite(blank.total).all())
    weighted = mixture_reward_fn(weights={"mode": 1.0, "component": 0.0})(video, prompts)
    torch.testing.assert_close(weighted["combined"], weighted["mode"])
    with pytest.raises(ValueError, match="unknown parts"):
        mixture_reward_fn(weights={"colour": 1.0})


def test_data_reward_means_are_the_prior_weights(world):
    """For data samples E[P(c | x0)] = w_c: the rewards' means over the data are the base rates."""
    index = torch.arange(world.num_prompts).repeat(512)
    x0 = world.sample(index, torch.Generator().manual_seed(3))[0]
    parts = world.rewards(x0, index)
    rates = world.base_rates()
    for key in ("mode", "component", "combined"):
        v = parts[key]
        assert abs(float(v.mean()) - rates[key]) < 4 * float(v.std()) / math.sqrt(v.numel()), key


# --- the oracle PRM ------------------------------------------------------------------------------------


def _monte_carlo(world, x, sigma, p, n, gen, variance_floor=True):
    """``E[combined(x0) | x_sigma = x]`` by importance sampling, stratified by component.

    ``x0 ~ N(m_c, s_c^2 I)`` per component (the data's own generative process; nothing of the oracle's
    closed form), weights ``N(x; (1 - sigma) x0, sigma^2 I)``, estimate ``sum_c w_c E_c[lik r] /
    sum_c w_c E_c[lik]`` with its delta-method standard error.
    """
    means = world.means[p].reshape(-1, world.dim)
    stds = world.stds[p].reshape(-1)
    w = world.weights[p].reshape(-1)
    c = means.shape[0]
    x0 = means[:, None] + stds[:, None, None] * torch.randn(c, n, world.dim, generator=gen, dtype=torch.float64)
    loglik = -((x - (1 - sigma) * x0) ** 2).sum(-1) / (2 * sigma**2)
    r = _reference_rewards(world, x0.reshape(-1, world.dim), p).view(c, n)
    e = torch.exp(loglik - loglik.max())
    a_c, b_c = (e * r).mean(1), e.mean(1)
    a, b = (w * a_c).sum(), (w * b_c).sum()
    est = a / b
    var_a = (w**2 * (e * r).var(1) / n).sum()
    var_b = (w**2 * e.var(1) / n).sum()
    cov = (w**2 * ((e * r - a_c[:, None]) * (e - b_c[:, None])).sum(1) / ((n - 1) * n)).sum()
    se = torch.sqrt((var_a - 2 * est * cov + est**2 * var_b).clamp_min(0)) / b
    return float(est), float(se)


def test_oracle_equals_monte_carlo_at_several_sigmas(world):
    oracle = MixtureOraclePRM(world)
    gen = torch.Generator().manual_seed(0)
    p = 5
    z_oracle, z_wrong = [], []
    for sigma in (0.3, 0.5, 0.7, 0.9):
        x0 = world.sample(torch.full((64,), p), gen)[0]
        x = (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        values = oracle(x, sigma, world.encode([world.prompts[p]] * 64))
        informative = ((values > 0.05) & (values < 0.95)).nonzero().flatten()[:2]
        assert informative.numel() == 2
        # A plausible wrong oracle: the posterior under N((1 - sigma) m, sigma^2 I), forgetting the component std.
        means = (1 - sigma) * world.means[p].reshape(-1, world.dim)
        for i in informative.tolist():
            est, se = _monte_carlo(world, x[i], sigma, p, 16384, gen)
            z_oracle.append((float(values[i]) - est) / se)
            logits = world.log_weights[p].reshape(-1) - ((x[i] - means) ** 2).sum(-1) / (2 * sigma**2)
            post = torch.softmax(logits, 0).view(world.config.num_modes, -1)
            z_wrong.append((0.5 * float(post[0].sum() + post[0, 0]) - est) / se)
    assert max(abs(z) for z in z_oracle) < 4, z_oracle
    assert max(abs(z) for z in z_wrong) > 6, z_wrong  # the check can tell a wrong oracle apart


def test_oracle_is_calibrated_on_the_data_joint(world):
    """``E[(r(x0) - o(x_sigma)) h(x_sigma)] = 0`` for ``h = 1`` and ``h = o``: the regression property."""
    oracle = MixtureOraclePRM(world)
    gen = torch.Generator().manual_seed(1)
    index = torch.arange(world.num_prompts).repeat(256)
    embeds = world.encode([world.prompts[i] for i in index])
    for sigma in (0.1, 0.4, 0.6, 0.8, 1.0):
        x0 = world.sample(index, gen)[0]
        x = (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        o = oracle(x, sigma, embeds)
        residual = world.rewards(x0, index)["combined"] - o
        for h in (torch.ones_like(o), o - o.mean()):
            term = residual * h
            assert abs(float(term.mean())) < 4 * float(term.std()) / math.sqrt(term.numel()) + 1e-12, sigma


def test_oracle_limits_gradient_and_sampler_call(world):
    oracle = MixtureOraclePRM(world)
    index = torch.arange(8)
    x0 = world.sample(index, 2)[0]
    embeds = world.encode([world.prompts[i] for i in index])
    # sigma = 0: the outcome reward; sigma = 1: the prior.
    torch.testing.assert_close(oracle(x0, 0.0, embeds), world.rewards(x0, index)["combined"])
    torch.testing.assert_close(
        oracle(torch.randn(8, world.dim, dtype=torch.float64), 1.0, embeds),
        world.rewards_of_posterior(world.weights[index])["combined"],
    )
    parts = {p: MixtureOraclePRM(world, part=p)(x0, 0.3, embeds) for p in ("mode", "component")}
    torch.testing.assert_close(oracle(x0, 0.3, embeds), 0.5 * (parts["mode"] + parts["component"]))
    x = (0.6 * x0 + 0.4 * torch.randn(x0.shape, dtype=torch.float64)).requires_grad_()
    sigma = torch.full((8,), 0.4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: oracle(t, sigma, embeds), (x,))
    # As the sampler calls it: latents [B, D, 1, 1, 1] float32, sigma [B] float32.
    latents = x.detach().float().view(8, *world.latent_shape)
    value, grad = ops.reward_grad(oracle, latents, sigma.float(), embeds)
    assert value.shape == (8,) and value.dtype == torch.float32 and grad.shape == latents.shape
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().max()) > 0


# --- the base model ------------------------------------------------------------------------------------


def test_model_runs_like_a_diffusers_transformer(world, tmp_path):
    model = build_mixture_model(world, seed=3, hidden_dim=32, num_layers=2)
    x = torch.randn(4, *world.latent_shape)
    embeds = world.encode(world.prompts[:4])
    v = model(hidden_states=x, timestep=torch.full((4,), 500.0), encoder_hidden_states=embeds, return_dict=False)[0]
    assert v.shape == x.shape
    assert torch.equal(model(x, torch.full((4,), 500.0), embeds).sample, v)
    adapter = DiffusersFlowModel(model)
    torch.testing.assert_close(adapter(x, torch.full((4,), 0.5), Conditioning(embeds)), v)
    model.save_pretrained(tmp_path / "m")
    loaded = MixtureFlowModel.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(loaded(x, torch.full((4,), 500.0), embeds, return_dict=False)[0], v)
    traj = rollout(
        adapter,
        Conditioning(embeds.repeat_interleave(2, 0)),
        preset("euphonium_fast", guidance=True, guidance_lambda=10.0),
        shape=(8, *world.latent_shape),
        prm=MixtureOraclePRM(world),
        group_size=2,
        seed=0,
    )
    assert traj.x0.shape == (8, *world.latent_shape) and bool(traj.guided.all())
    assert bool((traj.process_reward > 0).all())


def test_pretraining_is_deterministic_and_learns(world):
    config = MixturePretrainConfig(
        steps=150, batch_size=128, hidden_dim=64, num_layers=2, lr=5e-3, warmup_steps=10, threads=1
    )
    a = pretrain_mixture_model(config, world)
    b = pretrain_mixture_model(config, world)
    for pa, pb in zip(a["model"].parameters(), b["model"].parameters()):
        assert torch.equal(pa, pb)
    # v = 0 scores E||eps - x0||^2 / D = 1 + E||x0||^2 / D; 150 steps already do much better.
    second_moment = (world.weights * ((world.means**2).sum(-1) + world.dim * world.stds**2)).sum(dim=(1, 2)).mean()
    trivial = 1 + float(second_moment) / world.dim
    assert a["record"]["final_loss"] < 0.6 * trivial, (a["record"]["final_loss"], trivial)


def test_committed_model_reproduces_the_base_rates(world):
    model = load_mixture_model()
    assert model.config.in_channels == world.dim and model.config.text_dim == world.config.embed_dim
    rates = measure_base_rates(model, world=world, samples_per_prompt=96, seed=0)
    # The data's rates (mode 0.233, component 0.072) within 0.03; far from the prompted target.
    assert abs(rates["model/mode"] - rates["data/mode"]) < 0.03, rates
    assert abs(rates["model/component"] - rates["data/component"]) < 0.03, rates
    assert rates["model/combined"] <= 0.45


def test_short_grpo_run_raises_the_reward():
    config = MixtureGRPOConfig(steps=30, prompts_per_step=8, group_size=8, eval_every=0, eval_per_prompt=8)
    out = mixture_grpo(load_mixture_model(), config)
    before, after = out["evals"][0], out["evals"][-1]
    assert [e["step"] for e in out["evals"]] == [0, 30]
    assert after["combined"] > before["combined"] + 0.1, out["evals"]


def test_oracle_is_nearly_calibrated_for_the_base_model(world):
    rows = oracle_calibration(load_mixture_model(), world=world, sigmas=(0.25, 0.75), samples_per_prompt=64)
    for row in rows:
        assert abs(row["data_bias"]) < 4 * row["data_bias_stderr"] + 1e-9, row  # the reference: exact on the data
        assert abs(row["bias"]) < 0.03, row  # the base model's samples: close (mean reward 0.15)


# --- the learned PRM -----------------------------------------------------------------------------------


def test_learned_prm_trains_with_the_library_trainer(world):
    from euphonium.rewards.prm import PRMTrainConfig
    from euphonium.toy.mixture.prm import collect_mixture_rollouts, compare_with_oracle, train_mixture_prm

    model = load_mixture_model()
    train = collect_mixture_rollouts(model, 1024, world=world, seed=0)
    held_out = collect_mixture_rollouts(model, 256, world=world, seed=1)
    assert train.x0.shape == (1024, *world.latent_shape) and train.prompt_embeds.shape == (1024, world.config.embed_dim)
    assert set(train.parts) == {"combined", "mode", "component"}
    torch.testing.assert_close(train.rewards, train.parts["combined"])
    config = PRMTrainConfig(steps=100, batch_size=128, lr=2e-3, warmup_steps=10, eval_every=100, checkpoint_every=0)
    out = train_mixture_prm(train, world=world, config=config, held_out=held_out)
    rows = {r["sigma"]: r for r in compare_with_oracle(out["prm"], held_out, world=world, sigmas=(0.25, 0.5))}
    assert rows[0.25]["pearson"] > 0.6 and rows[0.5]["pearson"] > 0.6, rows


def test_committed_prm_tracks_the_oracle(world):
    from euphonium.toy.mixture.prm import collect_mixture_rollouts, compare_with_oracle, load_mixture_prm

    prm = load_mixture_prm()
    fresh = collect_mixture_rollouts(load_mixture_model(), 512, world=world, seed=7)
    rows = compare_with_oracle(prm, fresh, world=world, sigmas=(0.25, 0.5, 0.75))
    for row in rows:
        assert row["pearson"] > 0.85, rows
    x = torch.randn(4, *world.latent_shape)
    value, grad = ops.reward_grad(prm, x, torch.full((4,), 0.5), world.encode(world.prompts[:4]))
    assert value.shape == (4,) and grad.shape == x.shape and bool(torch.isfinite(grad).all())


def test_early_and_late_guidance_are_told_apart(world):
    """Oracle guidance on mid-noise steps decides the mode; on low-noise steps, the detail (sub-cluster)."""
    from euphonium.sampler import SamplerConfig
    from euphonium.toy.mixture import sample_mixture

    model, prm = load_mixture_model(), MixtureOraclePRM(world)
    prompts = [p for p in world.prompts for _ in range(32)]
    index = world.prompt_index(prompts)

    def rates(**guidance):
        config = SamplerConfig(num_steps=16, shift=3.0, schedule="dance_grpo", noise_level=0.3, **guidance)
        traj, _ = sample_mixture(model, prompts, world=world, config=config, prm=prm if guidance else None, seed=0)
        parts = world.rewards(video_to_latents(latents_to_video(traj.x0)), index)
        mode, component = float(parts["mode"].mean()), float(parts["component"].mean())
        return mode, component / mode  # the prompted mode's rate, the prompted sub-cluster's rate inside it

    kw = dict(guidance=True, guidance_lambda=3.0, grad_normalize=True)
    base = rates()
    mid = rates(guidance_start=4, guidance_end=10, **kw)  # sigma 0.90 -> 0.64
    late = rates(guidance_start=12, guidance_end=16, **kw)  # sigma 0.50 -> 0
    assert mid[0] > base[0] + 0.2 and abs(mid[1] - base[1]) < 0.1, (base, mid)
    assert late[1] > base[1] + 0.3 and late[0] < mid[0], (base, late)
