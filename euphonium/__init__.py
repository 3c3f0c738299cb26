"""Euphonium: fused ops, guided sampling and a thin trainer for online RL of video flow models."""

from euphonium._version import __version__

__all__ = ["__version__"]
