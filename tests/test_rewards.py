"""Outcome rewards: the interface's checks, RewardSet, JPEG (DDPO), CLIP on a tiny random model, toy rewards."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from euphonium.rewards import (
    CallableReward,
    ClipScore,
    JpegCompressibility,
    JpegIncompressibility,
    RewardOutput,
    RewardSet,
    available_rewards,
    build_reward,
    check_videos,
    jpeg_size_kb,
    register_reward,
)


def videos(b=3, f=2, c=3, h=16, w=16):
    return torch.rand(b, f, c, h, w)


def prompts(b=3):
    return [f"prompt {i}" for i in range(b)]


# --- the interface ---------------------------------------------------------------------------------


def test_check_videos_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[B, F, C, H, W\]"):
        check_videos(torch.rand(2, 3, 16, 16), prompts(2))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_videos(videos() * 2 - 1, prompts())
    with pytest.raises(ValueError, match="prompts has 2 entries"):
        check_videos(videos(), prompts(2))
    with pytest.raises(TypeError, match="prompts must be a sequence"):
        check_videos(videos(), "one prompt")
    v = videos()
    v[1, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="sample 1"):
        check_videos(v, prompts())
    with pytest.raises(TypeError, match="floating-point"):
        check_videos(torch.zeros(3, 2, 3, 4, 4, dtype=torch.uint8), prompts())


@pytest.mark.parametrize(
    "bad,pattern",
    [
        (torch.ones(3, 2), r"reward 'mine' must return shape \[3\]"),
        (torch.ones(4), r"reward 'mine' must return shape \[3\]"),
        (torch.tensor([0.5, float("nan"), 1.0]), r"reward 'mine' returned nan for sample 1 \(prompt 'prompt 1'\)"),
        (torch.tensor([0.5, 1.0, float("inf")]), r"reward 'mine' returned inf for sample 2 \(prompt 'prompt 2'\)"),
        (torch.tensor([-float("inf"), 1.0, 0.0]), r"reward 'mine' returned -inf for sample 0"),
    ],
)
def test_callable_reward_names_reward_and_sample(bad, pattern):
    reward = CallableReward(lambda v, p: bad, name="mine")
    with pytest.raises(ValueError, match=pattern):
        reward(videos(), prompts())


def test_reward_exceptions_propagate_unchanged():
    class RewardServerDown(RuntimeError):
        pass

    def broken(v, p):
        raise RewardServerDown("no connection")

    with pytest.raises(RewardServerDown, match="no connection"):
        CallableReward(broken)(videos(), prompts())
    with pytest.raises(RewardServerDown):
        RewardSet({"broken": broken, "ok": lambda v, p: torch.ones(3)})(videos(), prompts())


def test_callable_reward_adapts_functions_modules_and_arrays():
    class Brightness(torch.nn.Module):
        def forward(self, v, p):
            return v.mean(dim=(1, 2, 3, 4)).double()

    v = videos()
    out = CallableReward(Brightness())(v, prompts())
    assert out.dtype == torch.float32 and out.shape == (3,)
    torch.testing.assert_close(out, v.mean(dim=(1, 2, 3, 4)))
    assert CallableReward(Brightness()).name == "Brightness"
    as_list = CallableReward(lambda v, p: [1, 2, 3], name="list")(v, prompts())
    torch.testing.assert_close(as_list, torch.tensor([1.0, 2.0, 3.0]))
    as_numpy = CallableReward(lambda v, p: np.arange(3)[:, None], name="np")(v, prompts())  # [B, 1] is accepted
    torch.testing.assert_close(as_numpy, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(TypeError, match="must be callable"):
        CallableReward(3)


def test_reward_set_returns_total_and_parts():
    v = videos()
    brightness = lambda v, p: v.mean(dim=(1, 2, 3, 4))  # noqa: E731
    red = lambda v, p: v[:, :, 0].mean(dim=(1, 2, 3))  # noqa: E731
    multi = lambda v, p: {"a": v.amax(dim=(1, 2, 3, 4)), "b": v.amin(dim=(1, 2, 3, 4))}  # noqa: E731
    rs = RewardSet(
        {"brightness": brightness, "red": red, "multi": multi},
        weights={"brightness": 2.0, "red": -0.5, "a": 0.0, "b": 1.5},
    )
    out = rs(v, prompts())
    assert isinstance(out, RewardOutput)
    assert set(out.parts) == {"brightness", "red", "a", "b"}
    expected = 2.0 * brightness(v, None) - 0.5 * red(v, None) + 1.5 * v.amin(dim=(1, 2, 3, 4))
    torch.testing.assert_close(out.total, expected)
    torch.testing.assert_close(out.parts["red"], red(v, None))
    unweighted = RewardSet({"brightness": brightness, "red": red})(v, prompts())
    torch.testing.assert_close(unweighted.total, brightness(v, None) + red(v, None))


def test_reward_set_checks_names_and_weights():
    v, p = videos(), prompts()
    ones = lambda v, p: torch.ones(v.shape[0])  # noqa: E731
    with pytest.raises(ValueError, match=r"weights names unknown rewards \['typo'\]"):
        RewardSet({"ones": ones}, weights={"ones": 1.0, "typo": 1.0})(v, p)
    with pytest.raises(ValueError, match=r"rewards \['b'\] have no weight"):
        RewardSet({"a": ones, "b": ones}, weights={"a": 1.0})(v, p)
    with pytest.raises(ValueError, match="both named 'a'"):
        RewardSet({"a": ones, "m": lambda v, p: {"a": torch.ones(3)}})(v, p)
    with pytest.raises(ValueError, match=r"weights\['a'\] must be a finite number"):
        RewardSet({"a": ones}, weights={"a": float("nan")})
    with pytest.raises(TypeError, match=r"weights\['a'\] must be a number, got True"):
        RewardSet({"a": ones}, weights={"a": True})
    with pytest.raises(ValueError, match=r"reward 'b' returned nan for sample 2"):
        RewardSet({"m": lambda v, p: {"a": torch.ones(3), "b": torch.tensor([0.0, 1.0, float("nan")])}})(v, p)
    with pytest.raises(ValueError, match="non-empty mapping"):
        RewardSet({})


def test_registry():
    assert {"jpeg_compressibility", "jpeg_incompressibility", "clip_score", "toy"} <= set(available_rewards())
    assert isinstance(build_reward("jpeg_compressibility", quality=80), JpegCompressibility)
    with pytest.raises(ValueError, match="unknown reward 'jpeg'"):
        build_reward("jpeg")
    with pytest.raises(ValueError, match="already registered"):
        register_reward("toy", lambda: None)


# --- JPEG ------------------------------------------------------------------------------------------


def _ddpo_jpeg_kb(frame: torch.Tensor) -> float:
    """DDPO's formula on one [C, H, W] image in [0, 1]."""
    array = (frame * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.tell() / 1000


def test_jpeg_orders_smooth_and_noisy_frames():
    h = w = 32
    ramp = torch.linspace(0, 1, w).view(1, 1, 1, 1, w).expand(1, 4, 3, h, w)
    smooth = (ramp * torch.rand(1, 1, 3, 1, 1)).contiguous()
    noisy = torch.rand(1, 4, 3, h, w)
    v, p = torch.cat([smooth, noisy]), prompts(2)
    incompressible = JpegIncompressibility()(v, p)
    compressible = JpegCompressibility()(v, p)
    assert incompressible[1] > 2 * incompressible[0] > 0
    assert compressible[0] > compressible[1]
    torch.testing.assert_close(compressible, -incompressible)


def test_jpeg_is_ddpo_per_frame_averaged():
    v = torch.rand(2, 3, 3, 24, 20)
    v[0, 1] = 0.5  # a flat frame among noisy ones
    expected = torch.tensor(
        [np.mean([_ddpo_jpeg_kb(v[b, f]) for f in range(3)]) for b in range(2)], dtype=torch.float32
    )
    torch.testing.assert_close(jpeg_size_kb(v), expected)
    grey = jpeg_size_kb(v[:, :, :1])
    assert grey.shape == (2,) and bool((grey > 0).all())
    with pytest.raises(ValueError, match="1 or 3 channels"):
        jpeg_size_kb(torch.rand(1, 2, 4, 8, 8))
    with pytest.raises(ValueError, match="quality must be >= 1, got 0"):
        JpegCompressibility(quality=0)
    with pytest.raises(TypeError, match="quality must be an integer, got 95.0"):
        jpeg_size_kb(v, quality=95.0)


# --- CLIP ------------------------------------------------------------------------------------------

WORDS = ["a", "red", "green", "square", "circle", "moving", "left", "right", "photo", "of"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIPModel, a word-level tokenizer and a CLIPImageProcessor config, saved to disk."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_clip")
    specials = ["<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", vocab["<|startoftext|>"]), ("<|endoftext|>", vocab["<|endoftext|>"])],
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=16,
    ).save_pretrained(path)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            pad_token_id=vocab["<pad>"],
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_clip_score_on_tiny_random_model(tiny_clip):
    import torch.nn.functional as F
    from transformers import AutoTokenizer, CLIPModel

    reward = ClipScore(tiny_clip, frame_batch_size=3)
    v = torch.rand(3, 4, 3, 16, 24)
    p = ["a red square moving left", "a green circle moving right", "a photo of a square"]
    score = reward(v, p)
    assert score.shape == (3,) and score.dtype == torch.float32
    assert bool((score.abs() <= 1).all())

    # Reference: the same CLIP loaded independently, features per frame, cosine averaged over frames.
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    tokens = AutoTokenizer.from_pretrained(tiny_clip)(p, padding=True, return_tensors="pt")
    with torch.no_grad():
        text = model.get_text_features(**tokens)
        text = text if isinstance(text, torch.Tensor) else text.pooler_output
        image = model.get_image_features(pixel_values=reward.preprocess(v.flatten(0, 1)))
        image = image if isinstance(image, torch.Tensor) else image.pooler_output
    cos = (F.normalize(image, dim=-1).view(3, 4, -1) * F.normalize(text, dim=-1)[:, None]).sum(-1).mean(1)
    torch.testing.assert_close(score, cos, rtol=1e-4, atol=1e-5)

    # Mean over frames: a clip of frames (A, B) scores the mean of (A, A) and (B, B).
    a, b = v[:1, :1], v[:1, 1:2]
    mixed = reward(torch.cat([a, b], dim=1), p[:1])
    pure = reward(torch.cat([torch.cat([a, a], 1), torch.cat([b, b], 1)]), p[:1] * 2)
    torch.testing.assert_close(mixed, pure.mean().view(1), rtol=1e-4, atol=1e-5)

    # Differentiable in the pixels (a gradient-based reward can use it), parameters frozen.
    v.requires_grad_(True)
    reward(v, p).sum().backward()
    assert v.grad is not None and bool(torch.isfinite(v.grad).all()) and float(v.grad.abs().sum()) > 0
    assert all(param.grad is None for param in reward.model.parameters())


def test_clip_score_needs_a_local_model(tmp_path):
    with pytest.raises(ValueError, match="local folder"):
        ClipScore(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        ClipScore(tmp_path)


# --- toy -------------------------------------------------------------------------------------------


def test_toy_reward_set_total_is_combined():
    from euphonium.toy import render, sample_prompts
    from euphonium.toy.rewards import TERMS, toy_reward_set, toy_rewards

    p = sample_prompts(4, int(torch.randint(0, 2**31, ())))
    clips = render(p, int(torch.randint(0, 2**31, ())))
    clips[1] = 0  # a blank clip scores low
    out = toy_reward_set()(clips, p)
    exact = toy_rewards(clips, p)
    torch.testing.assert_close(out.total, exact["combined"])
    assert set(out.parts) == set(TERMS) | {"combined"}
    assert float(out.total[1]) < 0.05 < float(out.total[0])
    custom = toy_reward_set({"color": 1.0})(clips, p)
    torch.testing.assert_close(custom.total, exact["color"])


def test_toy_oracle_prm_is_the_exact_reward_of_the_one_step_estimate():
    from euphonium import ops
    from euphonium.toy import load_toy_model, predict_velocity, render, sample_prompts, video_to_latents
    from euphonium.toy.rewards import ToyOraclePRM, toy_rewards
    from euphonium.toy.world import latents_to_video

    transformer, text_encoder = load_toy_model()
    weights = {"color": 1.0, "shape": 1.0, "size": 1.0, "direction": 1.0}
    prm = ToyOraclePRM(transformer, text_encoder, weights=weights)
    seed = int(torch.randint(0, 2**31, ()))
    prompts = sample_prompts(5, seed)
    sigma = torch.rand(5) * 0.5 + 0.1
    s = sigma.view(-1, 1, 1, 1, 1)
    x = (1 - s) * video_to_latents(render(prompts, seed)) + s * torch.randn(5, 3, 8, 16, 16)
    embeds = text_encoder.encode(prompts).detach()
    with torch.no_grad():
        expected = toy_rewards(
            latents_to_video(x - s * predict_velocity(transformer, x, sigma, embeds)), prompts, weights
        )["combined"]
        r, g = ops.reward_grad(prm, x, sigma, embeds)
    torch.testing.assert_close(r, expected)
    assert not any(p.requires_grad for p in prm.parameters())
    # The gradient is the reward's own: a central difference along a random direction agrees.
    d = torch.randn_like(x)
    d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1, 1)
    h = 1e-3
    with torch.no_grad():
        fd = (prm(x + h * d, sigma, embeds) - prm(x - h * d, sigma, embeds)) / (2 * h)
    torch.testing.assert_close((g * d).flatten(1).sum(1), fd, atol=2e-3, rtol=0.05)
    with pytest.raises(ValueError, match=r"prompt_embeds\[0\] is the embedding of none"):
        prm(x, sigma, embeds + 1.0)
    with pytest.raises(ValueError, match="prompt_embeds must flatten"):
        prm(x, sigma, embeds[:, :3])
