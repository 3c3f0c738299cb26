"""An exponential moving average of the trained weights, kept in fp32 (the evaluation samples with it)."""

from __future__ import annotations

import contextlib
from typing import Dict, List

import torch


class EMA:
    """``ema <- decay * ema + (1 - decay) * param`` after every optimizer update, per trained parameter."""

    def __init__(self, names: List[str], params: List[torch.nn.Parameter], decay: float):
        self.names, self.params, self.decay = names, params, decay
        self.shadow: Dict[str, torch.Tensor] = {n: p.detach().float().clone() for n, p in zip(names, params)}

    @torch.no_grad()
    def update(self) -> None:
        for name, param in zip(self.names, self.params):
            self.shadow[name].lerp_(param.detach().float(), 1 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self):
        """The averaged weights in the parameters for the duration of the block, the trained ones after."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for name, p in zip(self.names, self.params):
                p.copy_(self.shadow[name].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)
