"""``python -m euphonium.export CHECKPOINT --out DIR [--merge] [--weights ema|trained] [--dtype D]``

Writes a trained checkpoint in the form diffusers reads:

- LoRA runs (``model.lora_rank > 0``), default: ``DIR/pytorch_lora_weights.safetensors`` in diffusers'
  LoRA layout (``transformer.<module>.lora_A.weight``; rank, alpha and targets in the file's
  ``lora_adapter_metadata``), for ``pipe.load_lora_weights(DIR)`` of the family's pipeline (toy: the
  ``WanTransformer3DModel``'s ``load_lora_adapter(DIR, prefix="transformer")``). Wan2.2 A14B: the
  low-noise expert's adapter goes to ``pytorch_lora_weights_transformer_2.safetensors``, loaded with
  ``pipe.load_lora_weights(DIR, weight_name=..., load_into_transformer_2=True)``.
- ``--merge`` (LoRA or full fine-tuning): the whole pipeline with the trained weights in it (LoRA fused)
  as ``save_pretrained`` writes it, for ``<Pipeline>.from_pretrained(DIR)``; the toy world: its
  ``transformer/`` and ``text_encoder/`` folders (``euphonium.toy.load_toy_model(DIR)``).

CHECKPOINT is a checkpoint folder (``RUN/checkpoints/step-N``) or a run folder (its newest complete
checkpoint). ``--weights ema`` (default where the run kept an EMA: the weights its evaluation scored)
or ``trained``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# model.kind -> the diffusers pipeline class whose folder model.path is (the toy's transformer is a Wan one).
PIPELINES = {
    "toy": "WanPipeline",
    "wan": "WanPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
    "hunyuan_video": "HunyuanVideoPipeline",
}
# Families whose policy wraps the diffusers transformer(s) in a FlowTransformer (parameter names start
# with the model's attribute name: ``transformer.`` or, Wan2.2, ``transformer_2.``).
WRAPPED = ("sd3", "flux", "hunyuan_video")


class ExportError(ValueError):
    """A checkpoint that cannot be exported as asked (the message says why)."""


def load_run(checkpoint) -> Tuple[Path, Dict[str, Any]]:
    """``(folder, contents)`` of a checkpoint folder, or of a run folder's newest complete checkpoint,
    read and checked completely (:func:`euphonium.train.checkpoint.read_checkpoint`)."""
    from euphonium.train import checkpoint as ckpt

    path = Path(checkpoint)
    if not path.is_dir():
        raise ExportError(f"{path}: no such checkpoint or run folder")
    if (path / "state.json").is_file():
        return path, ckpt.read_checkpoint(path)
    found = ckpt.find_checkpoint(path)
    if found is None:
        raise ExportError(f"{path} is neither a checkpoint folder (state.json) nor a run folder with checkpoints")
    return found


def checkpoint_config(loaded: Dict[str, Any]):
    """The run's :class:`~euphonium.train.config.TrainConfig` from the checkpoint's ``config.json``."""
    from euphonium.train.config import config_from_dict

    values = {k: v for k, v in loaded["config"].items() if k not in ("from_algorithm", "resolved_sampler")}
    return config_from_dict(values)


def select_weights(loaded: Dict[str, Any], which: str = "ema") -> Dict[str, Any]:
    """The trained tensors: the EMA (``which="ema"``, where the run kept one) or the last update's."""
    if which not in ("ema", "trained"):
        raise ExportError(f"--weights must be ema or trained, got {which!r}")
    if which == "ema" and loaded.get("ema") is not None:
        return loaded["ema"]
    return loaded["trainable"]


def split_models(weights: Dict[str, Any], kind: str, wan_experts: bool) -> Dict[str, Dict[str, Any]]:
    """``{pipeline attribute: {name inside that transformer: tensor}}``: the policy's parameter names
    without the FlowTransformer's model prefix (``transformer.``/``transformer_2.``)."""
    if kind not in WRAPPED and not wan_experts:
        return {"transformer": dict(weights)}
    out: Dict[str, Dict[str, Any]] = {}
    for name, value in weights.items():
        model, _, rest = name.partition(".")
        if model not in ("transformer", "transformer_2") or not rest:
            raise ExportError(f"checkpoint weight {name!r} does not name one of the pipeline's transformers")
        out.setdefault(model, {})[rest] = value
    return out


def diffusers_lora_layers(weights: Dict[str, Any], adapter_name: str = "default") -> Dict[str, Any]:
    """peft's adapter tensors (``...to_q.lora_A.default.weight``) as ``get_peft_model_state_dict`` returns
    them (``...to_q.lora_A.weight``); anything else in ``weights`` is an :class:`ExportError`."""
    out = {}
    for name, value in weights.items():
        parts = name.split(".")
        if len(parts) < 3 or parts[-3] not in ("lora_A", "lora_B") or parts[-2] != adapter_name:
            raise ExportError(f"{name!r} is not a LoRA weight of adapter {adapter_name!r}")
        out[".".join(parts[:-2] + parts[-1:])] = value
    return out


def _lora_metadata(config) -> Dict[str, Any]:
    model = config.model
    return {
        "r": model.lora_rank,
        "lora_alpha": model.lora_alpha or model.lora_rank,
        "target_modules": sorted(model.lora_targets),
        "init_lora_weights": "gaussian",
    }


def _wan_experts(config) -> bool:
    if config.model.kind != "wan":
        return False
    index = Path(config.model.path) / "model_index.json"
    entry = json.loads(index.read_text()).get("transformer_2") if index.is_file() else None
    return bool(entry and entry[0])


def export_lora(config, weights: Dict[str, Any], out: Path) -> Dict[str, Path]:
    """The LoRA adapters in diffusers' layout under ``out`` (see the module docstring); returns the files."""
    import diffusers

    if config.model.lora_rank <= 0:
        raise ExportError("the run trained all weights (model.lora_rank=0), not a LoRA: export it with --merge")
    pipeline = getattr(diffusers, PIPELINES[config.model.kind])
    written = {}
    for model, tensors in split_models(weights, config.model.kind, _wan_experts(config)).items():
        name = LORA_WEIGHT_NAME if model == "transformer" else f"pytorch_lora_weights_{model}.safetensors"
        pipeline.save_lora_weights(
            str(out),
            transformer_lora_layers=diffusers_lora_layers(tensors),
            weight_name=name,
            transformer_lora_adapter_metadata=_lora_metadata(config),
        )
        written[model] = out / name
    return written


def export_merged(config, weights: Dict[str, Any], out: Path, dtype: Optional[str] = None) -> Path:
    """The pipeline of ``config.model.path`` with the trained weights in it (LoRA fused), ``save_pretrained``."""
    import tempfile

    from euphonium.models.diffusers import DTYPES

    torch_dtype = DTYPES[dtype or config.model.dtype]
    if config.model.kind == "toy":
        return _export_toy(config, weights, out, torch_dtype)
    import diffusers

    pipe = getattr(diffusers, PIPELINES[config.model.kind]).from_pretrained(config.model.path, torch_dtype=torch_dtype)
    if config.model.lora_rank > 0:
        with tempfile.TemporaryDirectory() as tmp:
            files = export_lora(config, weights, Path(tmp))
            components = []
            for model, path in files.items():
                extra = {"load_into_transformer_2": True} if model == "transformer_2" else {}
                pipe.load_lora_weights(tmp, weight_name=path.name, adapter_name=f"euphonium_{model}", **extra)
                components.append(model)
            pipe.fuse_lora(components=components, lora_scale=1.0)
            pipe.unload_lora_weights()
    else:
        for model, tensors in split_models(weights, config.model.kind, _wan_experts(config)).items():
            _load_into(getattr(pipe, model), tensors, model)
    pipe.save_pretrained(str(out))
    return out


def _load_into(module, tensors: Dict[str, Any], where: str) -> None:
    import torch

    named = dict(module.named_parameters())
    unknown = sorted(set(tensors) - set(named))
    if unknown:
        raise ExportError(f"the checkpoint's {unknown[:3]} are not parameters of the pipeline's {where}")
    with torch.no_grad():
        for name, value in tensors.items():
            named[name].copy_(value.to(named[name].dtype))


def _export_toy(config, weights: Dict[str, Any], out: Path, dtype) -> Path:
    from euphonium.toy import load_toy_model, save_toy_model

    transformer, text_encoder = load_toy_model(config.model.path, device="cpu", dtype=dtype)
    if config.model.lora_rank > 0:
        from peft import LoraConfig

        meta = _lora_metadata(config)
        transformer.add_adapter(LoraConfig(**meta))
        _load_into(transformer, weights, "transformer")
        transformer.fuse_lora(lora_scale=1.0)
        transformer.unload_lora()
    else:
        _load_into(transformer, weights, "transformer")
    save_toy_model(transformer, text_encoder, out)
    return out


def export(checkpoint, out, *, merge: bool = False, weights: str = "ema", dtype: Optional[str] = None) -> Path:
    """Export ``checkpoint`` (a checkpoint or run folder) to ``out`` (see the module docstring)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not an empty folder")
    _, loaded = load_run(checkpoint)
    config = checkpoint_config(loaded)
    tensors = select_weights(loaded, weights)
    out.mkdir(parents=True, exist_ok=True)
    if merge:
        return export_merged(config, tensors, out, dtype)
    export_lora(config, tensors, out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m euphonium.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint folder (RUN/checkpoints/step-N) or a run folder (its newest)")
    parser.add_argument("--out", required=True, help="an empty or new folder")
    parser.add_argument("--merge", action="store_true", help="a whole pipeline folder with the weights merged")
    parser.add_argument("--weights", default="ema", choices=("ema", "trained"), help="EMA (default, where kept)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="--merge: default model.dtype")
    args = parser.parse_args(argv)
    from euphonium.checkpointing import CheckpointError
    from euphonium.train.config import ConfigError

    try:
        out = export(args.checkpoint, args.out, merge=args.merge, weights=args.weights, dtype=args.dtype)
    except (ExportError, ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
