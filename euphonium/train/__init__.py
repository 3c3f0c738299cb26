"""``euphonium.train``: the thin GRPO trainer (``python -m euphonium.train``).

``Trainer`` is imported on first use, so that the command checks its config before torch loads.
"""

from euphonium.train.config import ConfigError, ModelConfig, TrainConfig, load_config

__all__ = ["ConfigError", "ModelConfig", "TrainConfig", "Trainer", "load_config"]


def __getattr__(name):
    if name == "Trainer":
        from euphonium.train.trainer import Trainer

        return Trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
