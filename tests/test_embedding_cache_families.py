"""``embedding_cache`` for SD3.5, FLUX and HunyuanVideo: a second run reads every prompt's conditioning (several
tensors: embeddings, pooled projections, attention masks, the embedded guidance) from disk without building the
text encoders, bit for bit what the first run computed, and equal to the uncached encoder's."""

import pytest
import test_models_flux as flux
import test_models_hunyuan_video as hunyuan
import test_models_sd3 as sd3
import torch
from test_models_flux import flux_dir  # noqa: F401  (fixtures)
from test_models_hunyuan_video import hunyuan_dir  # noqa: F401
from test_models_sd3 import sd3_dir  # noqa: F401

from euphonium.models import flux as flux_module
from euphonium.models import hunyuan_video as hunyuan_module
from euphonium.models import sd3 as sd3_module
from euphonium.train import load_config
from euphonium.train.policy import build_policy

FAMILIES = {
    # name: (fixture, overrides, prompts, the module and name of its text encoder, kwargs keys, another encoder)
    "sd3": ("sd3_dir", sd3.overrides, sd3.PROMPTS, (sd3_module, "SD3TextEncoder"), {"pooled_projections"}, {}),
    "flux": (
        "flux_dir", flux.overrides, flux.PROMPTS, (flux_module, "FluxTextEncoder"), {"pooled_projections", "guidance"},
        {"model.guidance_scale": 2.0},
    ),
    "hunyuan_video": (
        "hunyuan_dir", hunyuan.overrides, hunyuan.PROMPTS, (hunyuan_module, "HunyuanVideoTextEncoder"),
        {"pooled_projections", "encoder_attention_mask", "guidance"}, {"model.guidance_scale": 3.0},
    ),
}  # fmt: skip


def _tensors(cond):
    """Every tensor of a Conditioning by name (negative half included)."""
    out = {"prompt_embeds": cond.prompt_embeds, "negative_prompt_embeds": cond.negative_prompt_embeds}
    out.update({f"kwargs.{k}": v for k, v in cond.kwargs.items()})
    out.update({f"negative_kwargs.{k}": v for k, v in (cond.negative_kwargs or {}).items()})
    return {k: v for k, v in out.items() if v is not None}


def _assert_identical(a, b):
    a, b = _tensors(a), _tensors(b)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_second_run_reads_the_cache_without_the_text_encoders(family, request, tmp_path, monkeypatch):
    fixture, overrides, prompts, (module, encoder_name), keys, other = FAMILIES[family]
    root = request.getfixturevalue(fixture)
    cpu = torch.device("cpu")
    cache = tmp_path / "cache"
    plain = build_policy(load_config(None, overrides(root)), cpu).encode(prompts)
    assert keys <= set(plain.kwargs)

    config = load_config(None, overrides(root, embedding_cache=cache))
    first = build_policy(config, cpu).encode(prompts)
    _assert_identical(first, plain)
    negative = 1 if plain.negative_prompt_embeds is not None else 0  # CFG: the empty prompt is cached too
    assert len(list(cache.rglob("*.safetensors"))) == len(prompts) + negative

    def refuse(*args, **kwargs):
        raise AssertionError("the text encoders were loaded although every prompt is on disk")

    monkeypatch.setattr(getattr(module, encoder_name), "__init__", refuse)
    again = build_policy(config, cpu).encode(prompts[::-1])
    _assert_identical(again, first.select(list(range(len(prompts)))[::-1]))
    if other:
        # Another guidance scale is another conditioning (the guidance input is cached with it): it must encode.
        with pytest.raises(AssertionError, match="text encoders were loaded"):
            build_policy(load_config(None, overrides(root, embedding_cache=cache, **other)), cpu).encode(prompts[:1])
