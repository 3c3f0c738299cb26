"""``euphonium.train``: the thin GRPO trainer (``python -m euphonium.train``)."""

from euphonium.train.config import ConfigError, ModelConfig, TrainConfig, load_config
from euphonium.train.trainer import Trainer

__all__ = ["ConfigError", "ModelConfig", "TrainConfig", "Trainer", "load_config"]
