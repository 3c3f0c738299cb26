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
# DanceGRPO's objective on Euphonium's published sampler: `euphonium` without the method's two additions
# (PRM guidance and process advantages), so that the two differ by exactly those.
SAMPLER_PRESETS["dance_grpo_eu"] = {
    key: value for key, value in SAMPLER_PRESETS["euphonium"].items() if not key.startswith(("guidance", "grad_"))
}
SAMPLER_PRESETS["dance_grpo_eu"].pop("logprob_mean")
# The project's sampler: Flow-GRPO-Fast's exploration (a random 3-step SDE window in the first half of 10
# cps steps) with one initial noise per prompt group, so that a group differs only by the window's noise.
# The ladder grpo_fast -> td_fast -> euphonium_fast adds one thing per rung: TD process credit, then
# guidance (rho form, log-probs under the guided mean: the density actually sampled).
SAMPLER_PRESETS["grpo_fast"] = {**SAMPLER_PRESETS["flow_grpo_fast"], "same_initial_noise": True}
SAMPLER_PRESETS["td_fast"] = dict(SAMPLER_PRESETS["grpo_fast"])
SAMPLER_PRESETS["euphonium_fast"] = {
    **SAMPLER_PRESETS["grpo_fast"],
    "guidance": True,
    "guidance_start": 0,
    "guidance_form": "rho",
    "guidance_rho": 0.5,
    "logprob_mean": "guided",
}

# What each algorithm sets in the trainer's objective (TrainConfig fields), unless the config sets it.
# process_advantage: "none" (outcome reward only), "state" (upstream Euphonium: the PRM score of each
# guided step's input, whose expected policy gradient is zero) or "td" (the change of the PRM score
# across each trained step; the outcome reward stands in for the score of the final state).
# updates_per_step: optimizer updates per batch of rollouts (the peers' published setups make 2: the
# batch is split in halves, so the second update's ratios leave 1 and the clip acts).
OBJECTIVE_PRESETS = {
    "flow_grpo": dict(process_advantage="none", updates_per_step=2),
    "flow_grpo_fast": dict(process_advantage="none", updates_per_step=2),
    "dance_grpo": dict(process_advantage="none", updates_per_step=2),
    "dance_grpo_eu": dict(process_advantage="none", updates_per_step=2),
    "euphonium": dict(process_advantage="state", updates_per_step=2),
    "grpo_fast": dict(process_advantage="none", updates_per_step=1),
    "td_fast": dict(process_advantage="td", updates_per_step=1),
    "euphonium_fast": dict(process_advantage="td", updates_per_step=1),
}

# Algorithms whose rollouts are guided by a process reward model.
GUIDED_ALGORITHMS = tuple(name for name, settings in SAMPLER_PRESETS.items() if settings.get("guidance"))
