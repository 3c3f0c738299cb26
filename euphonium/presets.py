"""The algorithms' presets, as plain data: one table that the sampler (:func:`euphonium.sampler.preset`)
and the trainer's config both read. No imports, so a config is checked before torch loads.

An algorithm's name is its sampler preset's name.
"""

SAMPLER_PRESETS = {
    "flow_grpo": dict(num_steps=20, shift=3.0, schedule="flow_grpo", noise_level=0.7),
    "flow_grpo_fast": dict(num_steps=10, shift=3.0, schedule="cps", noise_level=0.8, sde_window_size=3),
    "dance_grpo": dict(num_steps=16, shift=3.0, schedule="dance_grpo", noise_level=0.3, same_initial_noise=True),
    "euphonium": dict(
        num_steps=16,
        shift=5.0,
        schedule="dance_grpo",
        noise_level=0.25,
        same_initial_noise=True,
        guidance=True,
        guidance_start=12,
        guidance_end=None,
        guidance_interval=1,
        guidance_form="lambda",
        guidance_lambda=0.01,
        grad_normalize=False,
        logprob_mean="unguided",
    ),
}
# Euphonium's guidance settings on Flow-GRPO-Fast's sampler, guiding every SDE step (the window's).
SAMPLER_PRESETS["euphonium_fast"] = {
    **SAMPLER_PRESETS["euphonium"],
    **SAMPLER_PRESETS["flow_grpo_fast"],
    "guidance_start": 0,
}

# Algorithms whose rollouts are guided by a process reward model (and that train on process rewards).
GUIDED_ALGORITHMS = tuple(name for name, settings in SAMPLER_PRESETS.items() if settings.get("guidance"))
