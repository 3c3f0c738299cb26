"""``python -m euphonium.export`` for SD3.5, FLUX, HunyuanVideo and Wan2.2 A14B (both experts), on the families'
tiny random pipeline folders: one training step, then the exported LoRA loaded by the family's diffusers
pipeline (``load_lora_weights``; Wan2.2's low-noise expert with ``load_into_transformer_2=True``) holds exactly
the trained adapter weights at the trained scale, and ``--merge`` writes a pipeline whose transformer weights
are the base plus the fused adapter."""

import pytest
import test_models_flux as flux
import test_models_hunyuan_video as hunyuan
import test_models_sd3 as sd3
import test_models_wan22 as wan22
import torch
from test_models_flux import flux_dir  # noqa: F401  (fixtures)
from test_models_hunyuan_video import hunyuan_dir  # noqa: F401
from test_models_sd3 import sd3_dir  # noqa: F401
from test_models_wan22 import wan22_dir  # noqa: F401

from euphonium.export import main as export_main
from euphonium.train.__main__ import main as train_main

RANK, ALPHA = 2, 8  # alpha != rank: the export must carry the scale alpha / rank

FAMILIES = {
    # name: (fixture, overrides, pipeline class, trained transformers)
    "sd3": ("sd3_dir", sd3.overrides, "StableDiffusion3Pipeline", ("transformer",)),
    "flux": ("flux_dir", flux.overrides, "FluxPipeline", ("transformer",)),
    "hunyuan_video": ("hunyuan_dir", hunyuan.overrides, "HunyuanVideoPipeline", ("transformer",)),
    "wan22": ("wan22_dir", wan22.overrides, "WanPipeline", ("transformer", "transformer_2")),
}


def _trained(run):
    """The last step's trained tensors by pipeline component: ``{"transformer": {name: tensor}}``."""
    from safetensors.torch import load_file

    out = {}
    for name, value in load_file(str(run / "checkpoints" / "step-1" / "trainable.safetensors")).items():
        model, _, rest = name.partition(".")
        out.setdefault(model, {})[rest] = value
    return out


def _loaded_lora(module, adapter):
    """``{name as trained (adapter "default"): tensor}`` of the LoRA layers that diffusers loaded as ``adapter``."""
    return {
        name.replace(f".{adapter}.", ".default."): p.detach()
        for name, p in module.named_parameters()
        if f".{adapter}." in name
    }


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_export_loads_into_the_family_pipeline_and_merges(family, request, tmp_path):
    import diffusers
    from peft.tuners.lora import LoraLayer

    fixture, overrides, pipeline_class, components = FAMILIES[family]
    root = request.getfixturevalue(fixture)
    run = tmp_path / "run"
    argv = overrides(root, **{"model.lora_rank": RANK, "model.lora_alpha": ALPHA, "max_steps": 1, "lr": 5e-2})
    assert train_main(["--output-dir", str(run), *argv]) == 0
    trained = _trained(run)
    assert sorted(trained) == sorted(components)

    lora = tmp_path / "lora"
    assert export_main([str(run), "--out", str(lora), "--weights", "trained"]) == 0
    pipeline = getattr(diffusers, pipeline_class)
    pipe = pipeline.from_pretrained(root)
    for model in components:
        extra = {"load_into_transformer_2": True} if model == "transformer_2" else {}
        weight_name = (
            "pytorch_lora_weights.safetensors"
            if model == "transformer"
            else f"pytorch_lora_weights_{model}.safetensors"
        )
        pipe.load_lora_weights(str(lora), weight_name=weight_name, adapter_name=f"eu_{model}", **extra)
        module = getattr(pipe, model)
        got = _loaded_lora(module, f"eu_{model}")
        assert sorted(got) == sorted(trained[model])
        for name, value in trained[model].items():
            assert torch.equal(got[name], value.to(got[name].dtype)), name
        layers = [m for m in module.modules() if isinstance(m, LoraLayer) and f"eu_{model}" in m.lora_A]
        assert layers and all(m.scaling[f"eu_{model}"] == ALPHA / RANK for m in layers)
    assert any(v.abs().max() > 0 for t in trained.values() for k, v in t.items() if ".lora_B." in k)

    merged = tmp_path / "merged"
    assert export_main([str(run), "--out", str(merged), "--merge", "--weights", "trained"]) == 0
    fused, base = pipeline.from_pretrained(merged), pipeline.from_pretrained(root)
    for model in components:
        weights = dict(getattr(fused, model).named_parameters())
        base_weights = dict(getattr(base, model).named_parameters())
        assert not any("lora" in name for name in weights)
        for name, a in trained[model].items():
            if ".lora_A." not in name:
                continue
            layer = name.split(".lora_A.")[0]
            b = trained[model][name.replace(".lora_A.", ".lora_B.")]
            want = base_weights[f"{layer}.weight"].float() + ALPHA / RANK * (b.float() @ a.float())
            torch.testing.assert_close(weights[f"{layer}.weight"].float(), want, atol=1e-5, rtol=1e-5)
