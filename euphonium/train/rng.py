"""The run's named random streams: every draw of a run comes from a seed derived from the run's seed,
the stream's name and (for per-step streams) the step and rank, the same on every machine."""

from __future__ import annotations

from typing import Optional

import torch

# A stream's number is part of its seed: renumbering one changes every run's draws.
STREAMS = {
    "prompts": 0,  # per step: the step's prompt draw (the same on every rank)
    "rollout": 1,  # per step and rank: initial noise and SDE noise
    "minibatches": 2,  # per step and rank: trained steps and minibatch order
    "lora_init": 3,  # per run: peft's adapter initialisation
    "eval_prompts": 4,  # per run: the fixed evaluation set's prompts
    "eval_noise": 5,  # per run: the fixed evaluation set's initial noise
}


def derive_seed(*parts: int) -> int:
    """A 62-bit seed from integers, the same on every machine."""
    gen = torch.Generator().manual_seed(0x5EED)
    value = 0
    for part in parts:
        gen.manual_seed((value * 1_000_003 + int(part) + 1) & ((1 << 62) - 1))
        value = int(torch.randint(0, 2**62, (1,), generator=gen))
    return value


class RandomStreams:
    """``rng.seed("rollout", step=s, rank=r)``: the seed of a named stream; ``rng.generator(...)`` a CPU
    generator seeded with it."""

    def __init__(self, seed: int):
        self.run_seed = int(seed)

    def seed(self, name: str, *, step: Optional[int] = None, rank: Optional[int] = None) -> int:
        if name not in STREAMS:
            raise KeyError(f"unknown random stream {name!r}; streams are {sorted(STREAMS)}")
        parts = [self.run_seed] + ([step] if step is not None else []) + [STREAMS[name]]
        return derive_seed(*parts, *([rank] if rank is not None else []))

    def generator(self, name: str, *, step: Optional[int] = None, rank: Optional[int] = None) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed(name, step=step, rank=rank))
