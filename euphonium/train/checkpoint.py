"""Atomic checkpoints: ``DIR/checkpoints/step-N/`` written under a temporary name, then renamed.

A checkpoint holds the trainable weights (safetensors), the optimizer and LR scheduler states, the
EMA weights, the RNG states, the step and the resolved config. Only complete checkpoints (renamed
into place, with ``state.json``) are ever loaded, so a crash mid-write never loses the last good one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from safetensors.torch import load_file, save_file

_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(output_dir: Path):
    """Complete checkpoints under ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _NAME.match(path.name)
        if m and (path / "state.json").is_file():
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    trainable: Dict[str, torch.Tensor],
    optimizer,
    scheduler,
    ema: Optional[Dict[str, torch.Tensor]],
    config: Dict[str, Any],
    extra: Dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep`` complete ones."""
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    if ema is not None:
        save_file({k: v.contiguous().cpu() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    # state.json last: its presence marks the checkpoint complete.
    (tmp / "state.json").write_text(json.dumps({"step": step, **extra}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, *, optimizer, scheduler) -> Dict[str, Any]:
    """Restore optimizer, scheduler and RNG states from ``path``; returns the weights and the state."""
    path = Path(path)
    trainable = load_file(str(path / "trainable.safetensors"))
    ema = load_file(str(path / "ema.safetensors")) if (path / "ema.safetensors").is_file() else None
    states = torch.load(path / "optim.pt", weights_only=False)
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = json.loads((path / "state.json").read_text())
    return {"trainable": trainable, "ema": ema, "state": state}
