"""The run's folder and its checkpoints: ``DIR/checkpoints/step-N/``, written atomically, validated
completely before one is chosen.

A checkpoint holds the trainable weights and the EMA weights (safetensors), the optimizer and LR
scheduler states and the RNG states (``torch.save``, read back with ``weights_only=True``: tensors
and plain containers only, so a crafted file cannot run code), the step (``state.json``), the
resolved config and a ``manifest.json`` with every file's size and SHA-256
(:mod:`euphonium.checkpointing`). ``--resume`` takes the newest checkpoint that passes every check
(manifest, every file parsed, weights finite) and warns about each newer one it skips.

A run marks its folder with ``euphonium-run.json`` (:data:`RUN_MARKER`) before it writes anything
else there: a folder whose ``config.json``, ``metrics.jsonl``, ``checkpoints/``... no run wrote is
never written into. This module imports torch only when it reads or writes a checkpoint, so that
``python -m euphonium.train`` checks the folder before the heavy imports.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from euphonium import checkpointing as cp
from euphonium.checkpointing import CheckpointError, one_line
from euphonium.train.config import ConfigError, TrainConfig

RUN_MARKER = "euphonium-run.json"
# What a run writes at the top of its folder (besides the marker).
RUN_OUTPUTS = (
    "config.json",
    "metrics.jsonl",
    "eval.jsonl",
    "checkpoints",
    "tensorboard",
    "reward_curve.png",
    "samples.gif",
    "samples.png",
    "samples.txt",
    "eval_clips",
    "wandb",
)
# Outputs that mean the run got somewhere: without --resume the folder is refused.
_PROGRESS = ("metrics.jsonl", "eval.jsonl", "checkpoints")
# Settings that shape the trained tensors: a checkpoint cannot continue under other values.
_STRUCTURAL = ("kind", "lora_rank", "lora_targets")


class RunAborted(RuntimeError):
    """The run stopped itself (non-finite updates or weights); the message names the last checkpoint."""


# --------------------------------------------------------------------------------------------------
# The run's folder


def _is_run_folder(output_dir: Path) -> bool:
    """The folder holds a run: the marker, or (runs from before the marker) a ``config.json`` that
    is a resolved :class:`TrainConfig` or a ``checkpoints/step-N/state.json``."""
    if (output_dir / RUN_MARKER).is_file():
        return True
    try:
        saved = json.loads((output_dir / "config.json").read_text())
        fields = set(TrainConfig.__dataclass_fields__)
        if isinstance(saved, dict) and fields <= set(saved):
            return True
    except (OSError, ValueError):
        pass
    return any((path / "state.json").is_file() for _, path in cp.step_dirs(output_dir / "checkpoints"))


def check_output_dir(output_dir, resume: bool, *, announce: bool = True) -> bool:
    """Check that a run may write into ``output_dir``; True when it holds a run to continue.

    Refused (:class:`ConfigError`): a path that is a file; a folder holding outputs of a run's names
    (``config.json``, ``metrics.jsonl``, ``checkpoints/``, ...) that no run wrote; a run's folder
    without ``resume``. Other files (a log the shell redirected there) are left alone. With
    ``resume`` a missing or empty folder starts a fresh run, and says so.
    """
    from euphonium._checks import check_path

    try:
        output_dir = check_path("--output-dir", output_dir, kind="dir")
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
    present = [name for name in RUN_OUTPUTS if (output_dir / name).exists()]
    if present and not _is_run_folder(output_dir):
        raise ConfigError(
            f"output dir {output_dir} holds {', '.join(present)} that no euphonium run wrote "
            f"(no {RUN_MARKER}); the run would overwrite them: choose another --output-dir"
        )
    progress = [name for name in _PROGRESS if (output_dir / name).exists()]
    if progress and not resume:
        raise ConfigError(
            f"output dir {output_dir} holds another run ({', '.join(progress)}); "
            "pass --resume to continue it or choose another --output-dir"
        )
    if resume and not progress and announce:
        print(f"--resume: {output_dir} holds no run yet; starting a fresh run there", file=sys.stderr)
    return bool(progress)


def mark_run(output_dir: Path) -> None:
    """Write the run marker (first, before any other output of the run)."""
    output_dir = Path(output_dir)
    if not (output_dir / RUN_MARKER).is_file():
        output_dir.mkdir(parents=True, exist_ok=True)
        cp.atomic_write(output_dir / RUN_MARKER, json.dumps({"written_by": "euphonium.train", "version": 1}) + "\n")


def remove_orphans(output_dir: Path) -> list:
    """Delete the leftovers of a killed or failed writer: ``checkpoints/.tmp-*`` and the temporary
    files of the run's own rewrites (``.tmp-metrics.jsonl-<pid>``, ...)."""
    output_dir = Path(output_dir)
    names = [RUN_MARKER, *RUN_OUTPUTS]
    return cp.remove_orphans(output_dir / "checkpoints") + cp.remove_orphans(output_dir, names=names)


# --------------------------------------------------------------------------------------------------
# Writing


_ST_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


def _safetensors(tensors: Dict[str, Any]):
    """A writer of ``tensors`` in the safetensors format, one tensor at a time (no copy of the whole
    file in memory; ``safetensors.torch.load_file`` reads it)."""
    import torch

    items = sorted((k, v.detach().contiguous().cpu()) for k, v in tensors.items())
    header: Dict[str, Any] = {}
    offset = 0
    for name, t in items:
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _ST_DTYPES[str(t.dtype).replace("torch.", "")],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)

    def write(f) -> None:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, t in items:
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)

    return write


def _torch_save(obj):
    import torch

    return lambda f: torch.save(obj, f)


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    trainable: Dict[str, Any],
    optimizer,
    scheduler,
    ema: Optional[Dict[str, Any]],
    config: Dict[str, Any],
    extra: Dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically, then keep only the newest ``keep`` (and none after ``step``).

    A failed write (a full disk) raises :class:`euphonium.checkpointing.WriteError` and leaves nothing
    of the new checkpoint; the older ones are untouched.
    """
    import torch

    root = Path(output_dir) / "checkpoints"
    final = root / f"step-{step}"
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    with cp.atomic_directory(final) as ckpt:
        ckpt.write("trainable.safetensors", _safetensors(trainable))
        if ema is not None:
            ckpt.write("ema.safetensors", _safetensors(ema))
        ckpt.write("optim.pt", _torch_save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}))
        ckpt.write("rng.pt", _torch_save(rng))
        ckpt.write("config.json", json.dumps(config, indent=1))
        ckpt.write("state.json", json.dumps({"step": step, "ema": ema is not None, **extra}, indent=1))
    cp.rotate(root, keep, newest=step)
    return final


# --------------------------------------------------------------------------------------------------
# Reading


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({one_line(err)})") from None


def _load_tensors(path: Path, *, finite: bool) -> Dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for a bad header or length
        raise CheckpointError(f"{path}: not a readable safetensors file ({one_line(err)})") from None
    if finite:
        for name, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{path}: tensor {name!r} has non-finite values (NaN or inf)")
    return tensors


def _load_torch(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only; a pickle that
    would build any other object (and so could run code) is refused."""
    import torch

    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be read safely ({cp.describe_load_error(err)})") from None


def read_checkpoint(path: Path) -> Dict[str, Any]:
    """Every part of checkpoint ``path``, checked: the manifest's sizes and hashes, every file parsed,
    the weights finite, the step that of the folder's name. Raises :class:`CheckpointError` (one line
    naming the file and the reason) for anything else."""
    import torch

    path = Path(path)
    state = _load_json(path / "state.json")
    step = cp.STEP_NAME.match(path.name)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path / 'state.json'}: no integer 'step'")
    if step is not None and int(step.group(1)) != state["step"]:
        raise CheckpointError(f"{path / 'state.json'}: step {state['step']} in a folder named {path.name}")
    cp.verify_manifest(path)
    trainable = _load_tensors(path / "trainable.safetensors", finite=True)
    has_ema = state.get("ema", (path / "ema.safetensors").exists())
    ema = _load_tensors(path / "ema.safetensors", finite=True) if has_ema else None
    states = _load_torch(path / "optim.pt")
    if not isinstance(states, dict) or not {"optimizer", "scheduler"} <= set(states):
        raise CheckpointError(f"{path / 'optim.pt'}: not an optimizer and scheduler state")
    for group in states["optimizer"].get("state", {}).values():
        for key, value in group.items() if isinstance(group, dict) else ():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"{path / 'optim.pt'}: optimizer state {key!r} has non-finite values")
    rng = _load_torch(path / "rng.pt")
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor):
        raise CheckpointError(f"{path / 'rng.pt'}: not a random-generator state")
    config = _load_json(path / "config.json")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path / 'config.json'}: not a config mapping")
    return {"trainable": trainable, "ema": ema, "states": states, "rng": rng, "state": state, "config": config}


def find_checkpoint(output_dir: Path, *, warn: bool = True) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The newest checkpoint of ``output_dir`` that :func:`read_checkpoint` accepts and its contents;
    None when there is none; :class:`CheckpointError` when there are some and none is usable."""
    return cp.newest_valid(Path(output_dir) / "checkpoints", read_checkpoint, warn=warn)


def check_compatible(path: Path, saved: Dict[str, Any], config: TrainConfig) -> None:
    """Raise :class:`ConfigError` (one line) when ``config`` shapes the trained tensors differently
    from the checkpoint's ``saved`` config (``model.lora_rank``, ...): before any optimizer exists."""
    model = config.to_dict()["model"]
    before = saved.get("model", {}) if isinstance(saved.get("model"), dict) else {}
    differ = [
        f"model.{k}={before[k]!r} there, {model[k]!r} here"
        for k in _STRUCTURAL
        if k in before and before[k] != model[k]
    ]
    if differ:
        raise ConfigError(
            f"cannot resume {path}: it was trained with other tensors ({'; '.join(differ)}); "
            "resume with its settings or start a new --output-dir"
        )


def apply_checkpoint(loaded: Dict[str, Any], *, optimizer, scheduler) -> None:
    """Restore the optimizer, scheduler and RNG states of a :func:`read_checkpoint` result."""
    import torch

    optimizer.load_state_dict(loaded["states"]["optimizer"])
    scheduler.load_state_dict(loaded["states"]["scheduler"])
    torch.set_rng_state(loaded["rng"]["torch"])
    if "cuda" in loaded["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(loaded["rng"]["cuda"])


def load_checkpoint(path: Path, *, optimizer, scheduler) -> Dict[str, Any]:
    """Check checkpoint ``path`` completely, restore optimizer, scheduler and RNG states from it;
    returns the weights (``trainable``, ``ema``) and ``state``."""
    loaded = read_checkpoint(path)
    apply_checkpoint(loaded, optimizer=optimizer, scheduler=scheduler)
    return loaded


def checkpoint_dirs(output_dir: Path):
    """The checkpoint folders under ``output_dir/checkpoints`` (renamed into place), oldest first."""
    return [p for _, p in cp.step_dirs(Path(output_dir) / "checkpoints") if (p / "state.json").is_file()]


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    """The newest checkpoint folder (not validated: :func:`find_checkpoint` checks them)."""
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None
