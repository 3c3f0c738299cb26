"""Drop-in replacements for the step functions of existing GRPO trainers, computed by ``euphonium.ops``.

A trainer forked from Flow-GRPO or DanceGRPO (or upstream Euphonium) switches by changing one import:

- :func:`euphonium.compat.flow_grpo.sde_step_with_logprob`: Flow-GRPO's
  ``flow_grpo.diffusers_patch.sd3_sde_with_logprob.sde_step_with_logprob`` (``sde_type`` ``"sde"`` and
  ``"cps"``, ``return_sqrt_dt``);
- :func:`euphonium.compat.dance_grpo.flux_step`: DanceGRPO's ``flux_step`` (``fastvideo/train_grpo_*.py``)
  and upstream Euphonium's guided ``flux_step`` (``euphonium/grpo/grpo_sampling/flux_step.py``: the
  PRM/SPSA gradient arguments).

Same signatures, return tuples, shapes and dtypes, the same random draws from the same generators.
What changes: the log-prob comes from the fused ops (deterministic, independent of the batch it is
computed in and of the thread count, so the rollout's and the training's log-prob of a transition
are the same bits and the first importance ratio is exactly 1), its backward is the fused one that
saves only the inputs, and bf16 inputs are read as they are instead of being copied to fp32 first.
Each module's docstring lists where the numbers differ from the peer's by rounding.
"""

from euphonium.compat import dance_grpo, flow_grpo

__all__ = ["dance_grpo", "flow_grpo"]
