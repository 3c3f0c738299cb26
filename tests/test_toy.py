"""The toy video world: renderer, prompt grammar, exact rewards, committed base model, pretraining."""

import json
from pathlib import Path

import pytest
import torch

from euphonium import toy
from euphonium.toy import world
from euphonium.toy.__main__ import main as toy_cli
from euphonium.toy.pretrain import PretrainConfig
from euphonium.toy.rewards import (
    DEFAULT_WEIGHTS,
    attribute_accuracy,
    classify,
    reference_statistics,
    toy_rewards,
)

CLIP_SHAPE = (world.NUM_FRAMES, world.CHANNELS, world.HEIGHT, world.WIDTH)


def _seed() -> int:
    return int(torch.randint(2**31 - 1, ()))


# --- prompts and renderer ---------------------------------------------------------------------------


def test_prompt_grammar_round_trips():
    prompts = toy.all_prompts()
    assert len(prompts) == len(set(prompts)) == 4 * 3 * 2 * 4
    for p in prompts:
        a = toy.parse_prompt(p)
        assert toy.format_prompt(a["color"], a["shape"], a["direction"], a["size"]) == p
    assert toy.parse_prompt("  A red   square moving LEFT ") == {
        "color": "red",
        "shape": "square",
        "size": None,
        "direction": "left",
    }


@pytest.mark.parametrize(
    "bad",
    [
        "a red square",
        "a purple square moving left",
        "a red star moving left",
        "a huge red square moving left",
        "a red square moving sideways",
        "the red square moving left",
        "",
    ],
)
def test_bad_prompts_raise(bad):
    with pytest.raises(ValueError, match="prompt"):
        toy.parse_prompt(bad)


def test_render_is_deterministic_and_in_range():
    seed = _seed()
    prompts = toy.sample_prompts(24, seed)
    assert prompts == toy.sample_prompts(24, seed)
    a = toy.render(prompts, seed)
    b = toy.render(prompts, torch.Generator().manual_seed(seed))
    assert a.shape == (24, *CLIP_SHAPE) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, toy.render(prompts, seed + 1))
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    # The object stays whole inside the frame: every frame has the same ink area (up to antialiasing).
    area = a.amax(dim=2).sum(dim=(2, 3))
    assert float((area.amax(1) / area.amin(1)).max()) < 1.1


def test_render_moves_in_the_prompted_direction():
    prompts = [f"a large red square moving {d}" for d in toy.DIRECTIONS]
    video = toy.render(prompts, _seed())
    ink = video.amax(dim=2)
    coords = torch.arange(world.WIDTH) + 0.5
    cx = (ink.sum(2) * coords).sum(-1) / ink.sum((2, 3))
    cy = (ink.sum(3) * coords).sum(-1) / ink.sum((2, 3))
    travel = world.SPEED * (world.NUM_FRAMES - 1)
    for i, d in enumerate(toy.DIRECTIONS):
        dx, dy = toy.DIRECTIONS[d]
        assert float(cx[i, -1] - cx[i, 0]) == pytest.approx(dx * travel, abs=0.05)
        assert float(cy[i, -1] - cy[i, 0]) == pytest.approx(dy * travel, abs=0.05)


def test_noisy_captions_name_the_rendered_value_at_the_given_rate():
    seed = _seed()
    prompts = toy.sample_prompts(6000, seed)
    accuracy = {"color": 0.4, "shape": 0.0, "direction": 0.7}
    captions = world.noisy_captions(prompts, accuracy, seed)
    assert captions == world.noisy_captions(prompts, accuracy, torch.Generator().manual_seed(seed))
    true, said = [toy.parse_prompt(p) for p in prompts], [toy.parse_prompt(c) for c in captions]
    for key in world.ATTRIBUTES:
        kept = sum(t[key] == c[key] for t, c in zip(true, said)) / len(prompts)
        assert kept == pytest.approx(accuracy.get(key, 1.0), abs=0.03), key
    # A wrong caption names each other value equally often: red clips are called green, blue, yellow alike.
    wrong = [c["color"] for t, c in zip(true, said) if t["color"] == "red" and c["color"] != "red"]
    counts = [wrong.count(v) / len(wrong) for v in ("green", "blue", "yellow")]
    assert max(abs(c - 1 / 3) for c in counts) < 0.06, counts
    # No noise: the prompts themselves; a prompt without a size word keeps none.
    assert world.noisy_captions(prompts[:50], {}, seed) == prompts[:50]
    assert world.noisy_captions(["a red square moving left"], {"size": 0.0}, seed) == ["a red square moving left"]
    with pytest.raises(ValueError, match="unknown attribute"):
        world.noisy_captions(prompts[:2], {"colour": 0.5})
    with pytest.raises(ValueError, match="probability"):
        world.noisy_captions(prompts[:2], {"color": 1.5})


def test_noisy_captions_from_given_uniforms():
    prompt = ["a small red square moving left"]
    acc = {"color": 0.4, "size": 0.5}
    u = torch.tensor([[0.39, 0.0, 0.2, 0.0]], dtype=torch.float64)
    assert world.noisy_captions(prompt, acc, uniforms=u) == prompt
    u = torch.tensor([[0.4, 0.0, 0.5, 0.0]], dtype=torch.float64)  # the first other colour, the other size
    assert world.noisy_captions(prompt, acc, uniforms=u) == ["a large green square moving left"]
    u = torch.tensor([[0.999, 0.99, 0.99, 0.99]], dtype=torch.float64)  # shape, direction: not noisy
    assert world.noisy_captions(prompt, acc, uniforms=u) == ["a large yellow square moving left"]
    with pytest.raises(ValueError, match="uniforms"):
        world.noisy_captions(prompt, acc, uniforms=torch.ones(1, 4))
    with pytest.raises(ValueError, match="uniforms"):
        world.noisy_captions(prompt, acc, uniforms=torch.zeros(2, 4))


def test_noise_coupled_choices_are_uniform_and_read_off_the_noise():
    from euphonium.toy.pretrain import noise_pattern, noise_uniforms

    patterns = torch.stack([noise_pattern(k).flatten() for k in world.ATTRIBUTES])
    torch.testing.assert_close(patterns @ patterns.T, torch.eye(4, dtype=torch.float64) * patterns.shape[1])
    eps = torch.randn(8000, world.CHANNELS, world.NUM_FRAMES, world.HEIGHT, world.WIDTH)
    u = noise_uniforms(eps)
    assert u.shape == (8000, 4) and float(u.min()) >= 0 and float(u.max()) < 1
    torch.testing.assert_close(u.mean(0), torch.full((4,), 0.5, dtype=torch.float64), atol=0.015, rtol=0)
    torch.testing.assert_close(u.std(0), torch.full((4,), (1 / 12) ** 0.5, dtype=torch.float64), atol=0.01, rtol=0)
    assert float((torch.corrcoef(u.T) - torch.eye(4, dtype=torch.float64)).abs().max()) < 0.05
    # Only the patterns' projections matter: a constant shift of the noise changes no choice.
    torch.testing.assert_close(noise_uniforms(eps[:10] + 0.7), u[:10])
    # The (caption, rendered) pairs have the caption-noise law: the caption's colour with probability p.
    captions = toy.sample_prompts(8000, _seed())
    rendered = world.noisy_captions(captions, {"color": 0.4}, uniforms=u)
    kept = sum(toy.parse_prompt(a)["color"] == toy.parse_prompt(b)["color"] for a, b in zip(captions, rendered))
    assert kept / 8000 == pytest.approx(0.4, abs=0.03)
    with pytest.raises(ValueError, match="caption_coupling needs"):
        PretrainConfig(caption_coupling=True)


def test_latents_video_round_trip():
    video = torch.rand(3, *CLIP_SHAPE)
    latents = toy.video_to_latents(video)
    assert latents.shape == (3, world.CHANNELS, world.NUM_FRAMES, world.HEIGHT, world.WIDTH)
    assert float(latents.min()) >= -1 and float(latents.max()) <= 1
    torch.testing.assert_close(toy.latents_to_video(latents), video)
    with pytest.raises(ValueError, match="x must have"):
        toy.latents_to_video(torch.rand(3, 8, 16, 16))


# --- rewards ------------------------------------------------------------------------------------------


def test_rendered_clips_score_high_for_their_own_prompt():
    prompts = toy.all_prompts()
    video = toy.render(prompts, _seed())
    r = toy_rewards(video, prompts)
    assert set(r) == {*DEFAULT_WEIGHTS, "combined"}
    for key, values in r.items():
        assert values.shape == (len(prompts),) and values.dtype == torch.float32
        assert float(values.min()) > 0.85, key
    acc = attribute_accuracy(video, prompts)
    assert all(float(v.min()) == 1.0 for v in acc.values())


def test_known_answer_red_square_left():
    video = toy.render(["a small red square moving left"] * 2, _seed())
    own = toy_rewards(video, ["a small red square moving left"] * 2)
    other = toy_rewards(video, ["a small blue circle moving right"] * 2)
    for key in ("color", "direction", "shape"):
        assert float(own[key].min()) > 0.9, key
        assert float(other[key].max()) < 0.05, key
    assert float(own["combined"].min()) > 0.9 > 0.3 > float(other["combined"].max())
    wrong_size = toy_rewards(video, ["a large red square moving left"] * 2)
    assert float(wrong_size["size"].max()) < 0.1
    pred = classify(video)
    assert pred["color"] == ["red"] * 2 and pred["shape"] == ["square"] * 2
    assert pred["size"] == ["small"] * 2 and pred["direction"] == ["left"] * 2


def test_time_reversed_and_static_clips_lose_direction():
    prompts = ["a large green diamond moving up"] * 2
    video = toy.render(prompts, _seed())
    assert float(toy_rewards(video.flip(1), prompts)["direction"].max()) < 0.05
    static = video[:, :1].expand_as(video)
    r = toy_rewards(static, prompts)
    assert float(r["direction"].max()) < 0.05 and float(r["color"].min()) > 0.9


def test_blank_flooded_and_noise_clips_score_low():
    prompts = toy.sample_prompts(6, _seed())
    flooded = torch.zeros(6, *CLIP_SHAPE)
    for i, p in enumerate(prompts):
        flooded[i] = torch.tensor(toy.COLORS[toy.parse_prompt(p)["color"]]).view(1, 3, 1, 1)
    hacks = {
        "blank": torch.zeros(6, *CLIP_SHAPE),
        "grey": torch.full((6, *CLIP_SHAPE), 0.5),
        "flooded": flooded,
        "noise": torch.rand(6, *CLIP_SHAPE),
    }
    for name, video in hacks.items():
        r = toy_rewards(video, prompts)
        assert all(bool(torch.isfinite(v).all()) for v in r.values()), name
        assert float(r["combined"].max()) < 0.15, name
        assert float(r["size"].max()) < 0.05, name
    assert float(toy_rewards(hacks["blank"], prompts)["combined"].max()) < 1e-3


def test_rewards_are_differentiable():
    prompts = toy.sample_prompts(4, _seed())
    clean = toy.render(prompts, _seed())
    video = (0.8 * clean + 0.2 * torch.rand_like(clean)).requires_grad_(True)
    r = toy_rewards(video, prompts)
    for key in (*DEFAULT_WEIGHTS, "combined"):
        (grad,) = torch.autograd.grad(r[key].sum(), video, retain_graph=True)
        assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0, key
    # A small step along the gradient of the combined reward raises it.
    (grad,) = torch.autograd.grad(r["combined"].sum(), video)
    stepped = (video + 1e-3 * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1, 1)).clamp(0, 1)
    assert float(toy_rewards(stepped.detach(), prompts)["combined"].sum()) > float(r["combined"].detach().sum())


def test_size_free_prompt_accepts_either_size():
    video = toy.render(["a large blue circle moving down", "a small blue circle moving down"], _seed())
    r = toy_rewards(video, ["a blue circle moving down"] * 2)
    assert float(r["combined"].min()) > 0.9
    assert attribute_accuracy(video, ["a blue circle moving down"] * 2)["all"].tolist() == [1.0, 1.0]


def test_reward_inputs_are_checked():
    video = torch.rand(2, *CLIP_SHAPE)
    with pytest.raises(ValueError, match="videos must have shape"):
        toy_rewards(video[:, :, :, :8], ["a red square moving left"] * 2)
    with pytest.raises(ValueError, match="prompts has 1 entries"):
        toy_rewards(video, ["a red square moving left"])
    with pytest.raises(ValueError, match="unknown colour"):
        toy_rewards(video, ["a pink square moving left"] * 2)
    with pytest.raises(ValueError, match="unknown terms"):
        toy_rewards(video, ["a red square moving left"] * 2, weights={"colour": 1.0})
    with pytest.raises(TypeError, match="videos must be a torch.Tensor"):
        toy_rewards(video.numpy(), ["a red square moving left"] * 2)


def test_reference_statistics_separate_shapes_and_sizes():
    ref = reference_statistics()
    for size in toy.SIZES:
        kappas = [ref[size][s]["kappa"] for s in ("diamond", "circle", "square")]
        assert kappas == sorted(kappas) and min(b - a for a, b in zip(kappas, kappas[1:])) > 0.1
        for shape in toy.SHAPES:
            assert ref["large"][shape]["area"] > 1.8 * ref["small"][shape]["area"]


# --- text encoder and committed model ----------------------------------------------------------------


def test_text_encoder_pads_with_zeros_and_pools():
    _, encoder = toy.load_toy_model()
    prompts = ["a red square moving left", "a large yellow diamond moving up"]
    with torch.no_grad():
        h = encoder.encode(prompts)
    assert h.shape == (2, toy.TOY_TEXT_ENCODER_CONFIG["max_length"], encoder.config.dim)
    assert float(h[0, 5:].abs().max()) == 0 and float(h[1].abs().sum(-1).min()) > 0
    with torch.no_grad():
        pooled = encoder.encode_pooled(prompts)
        again = encoder.encode(prompts)
    torch.testing.assert_close(pooled[0], h[0, :5].mean(0))
    torch.testing.assert_close(again, h)  # deterministic


def test_committed_model_loads_and_samples():
    transformer, encoder = toy.load_toy_model()
    assert isinstance(transformer, __import__("diffusers").WanTransformer3DModel)
    assert transformer.config.in_channels == transformer.config.out_channels == world.CHANNELS
    prompts = toy.sample_prompts(4, _seed())
    latents = toy.sample_ode(transformer, encoder, prompts, steps=4, generator=_seed())
    assert latents.shape == (4, world.CHANNELS, world.NUM_FRAMES, world.HEIGHT, world.WIDTH)
    assert latents.dtype == torch.float32 and bool(torch.isfinite(latents).all())
    video = toy.latents_to_video(latents)
    assert video.shape == (4, *CLIP_SHAPE)
    assert toy_rewards(video, prompts)["combined"].shape == (4,)

    transformer16, encoder16 = toy.load_toy_model(dtype=torch.bfloat16)
    x = torch.randn(2, world.CHANNELS, world.NUM_FRAMES, world.HEIGHT, world.WIDTH)
    v = toy.predict_velocity(transformer16, x.bfloat16(), torch.rand(2), encoder16.encode(prompts[:2]))
    assert v.shape == x.shape and v.dtype == torch.bfloat16


def test_attribute_capability_tells_preference_from_capability():
    from euphonium.toy.report import attribute_capability

    prompts = [f"a large {c} square moving right" for c in toy.COLORS] * 2
    clips = toy.render(prompts, _seed())
    own = attribute_capability(clips, prompts)
    assert own["color"]["preference"] == 1.0 and own["color"]["clear"] == 1.0
    assert own["color"]["drawn"] == {c: 0.25 for c in toy.COLORS}
    assert own["direction"]["drawn"]["right"] == 1.0 and own["direction"]["drawn"]["None"] == 0.0
    # The same clips under prompts naming another colour: drawn cleanly, never the prompted colour.
    others = [p.replace(c, d) for p, c, d in zip(prompts, [*toy.COLORS] * 2, ["green", "blue", "yellow", "red"] * 2)]
    swapped = attribute_capability(clips, others)
    assert swapped["color"]["preference"] == 0.0 and swapped["color"]["clear"] == 1.0
    assert swapped["color"]["preference_by_value"] == {c: 0.0 for c in toy.COLORS}
    assert swapped["shape"]["preference"] == 1.0
    # Static clips show no direction at all.
    static = clips[:, :1].expand_as(clips).contiguous()
    still = attribute_capability(static, prompts)
    assert still["direction"]["clear"] == 0.0 and still["direction"]["drawn"]["None"] == 1.0


def test_main_job_weights_are_the_toy_config_s():
    import yaml

    from euphonium.toy.report import MAIN_JOB_ALGORITHM, MAIN_JOB_WEIGHTS

    config = yaml.safe_load((Path(toy.__file__).parents[1] / "configs" / "toy.yaml").read_text())
    assert config["rewards"]["toy"]["weights"] == MAIN_JOB_WEIGHTS
    assert config["algorithm"] == MAIN_JOB_ALGORITHM


def test_group_statistics_of_the_committed_model():
    from euphonium.toy.report import MAIN_JOB_WEIGHTS, group_statistics

    transformer, encoder = toy.load_toy_model()
    prompts = ["a small red square moving left", "a large blue circle moving up", "a small green diamond moving down"]
    stats = group_statistics(transformer, encoder, prompts, seed=_seed())
    assert stats["prompts"] == 3 and stats["group_size"] == 4
    weighted = sum(w * stats["terms"][k] for k, w in MAIN_JOB_WEIGHTS.items()) / sum(MAIN_JOB_WEIGHTS.values())
    assert stats["reward"] == pytest.approx(weighted, abs=1e-5)
    assert stats["within_group_std"] >= 0 and stats["between_prompt_std"] >= 0
    for key in world.ATTRIBUTES:
        row = stats["attributes"][key]
        assert 0 <= stats["flip_rate"][key] <= 1 and 0 <= row["preference"] <= 1 and 0 <= row["clear"] <= 1
        assert sum(row["drawn"].values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="group_size"):
        group_statistics(transformer, encoder, prompts, group_size=1)


# --- pretraining and report entry points --------------------------------------------------------------


@pytest.mark.slow
def test_pretrain_cli_runs_and_loss_falls(tmp_path):
    tiny = json.dumps({"num_layers": 1, "num_attention_heads": 1, "ffn_dim": 32})
    toy_cli(
        [
            "pretrain",
            "--output",
            str(tmp_path),
            "--steps",
            "40",
            "--batch-size",
            "8",
            "--warmup-steps",
            "5",
            "--eval-every",
            "0",
            "--seed",
            str(_seed() % 1000),
            "--transformer-config",
            tiny,
        ]
    )
    record = json.loads((tmp_path / "pretrain.json").read_text())
    losses = record["loss_every_10_steps"]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0]
    transformer, encoder = toy.load_toy_model(tmp_path)
    assert transformer.config.num_layers == 1
    assert toy.sample_ode(transformer, encoder, ["a red square moving left"], steps=2).shape[0] == 1
    # Continue that model on noisy captions: the record names the command, the captions and the first run.
    args = ["pretrain", "--output", str(tmp_path / "noisy"), "--init", str(tmp_path), "--steps", "3"]
    args += ["--batch-size", "4", "--eval-every", "0", "--caption-accuracy", '{"color": 0.5}', "--caption-coupling"]
    toy_cli(args)
    again = json.loads((tmp_path / "noisy" / "pretrain.json").read_text())
    assert again["config"]["caption_accuracy"] == {"color": 0.5} and again["config"]["init"] == str(tmp_path)
    assert again["config"]["caption_coupling"] is True
    assert again["init_record"]["loss_every_10_steps"] == losses
    assert again["command"].startswith("python -m euphonium.toy pretrain --output")
    assert toy.load_toy_model(tmp_path / "noisy")[0].config.num_layers == 1
    with pytest.raises(ValueError, match="init"):
        PretrainConfig(init=str(tmp_path), transformer_config={"num_layers": 2})
    with pytest.raises(ValueError, match="probability"):
        PretrainConfig(caption_accuracy={"shape": -0.1})


@pytest.mark.slow
def test_report_writes_pictures_and_numbers(tmp_path):
    toy_cli(["report", "--out", str(tmp_path), "--repeats", "1", "--steps", "2", "--no-groups"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["per_attribute"]) == set(world.ATTRIBUTES)
    assert report["per_attribute"]["color"]["red"]["n"] == 24
    assert 0 <= report["accuracy"]["all"] <= 1 and report["forward_timing"]["median_ms"] > 0
    assert (tmp_path / "samples.png").stat().st_size > 1000 and (tmp_path / "samples.gif").stat().st_size > 1000
    assert "groups" not in report
