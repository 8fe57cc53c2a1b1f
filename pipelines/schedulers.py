"""Samplers and noise schedules, taken from diffusers by name (never re-implemented).

`make_scheduler("dpm++", prior.noise_config)` builds a diffusers scheduler on the model's own training
schedule, so only the sampler changes. diffusers is imported only when a scheduler is built.
"""

from __future__ import annotations

from .errors import UserError

SAMPLERS = {  # our name -> diffusers class and its extra config
    "ddim": ("DDIMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}
# Our names -> diffusers' `beta_schedule` values. "cosine" is Improved DDPM's (Nichol & Dhariwal 2021, eq. 17).
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


def beta_schedule_config(model_config: dict, beta_schedule: str | None) -> dict:
    """The model's scheduler config, with its beta schedule replaced when one is named."""
    config = dict(model_config)
    if beta_schedule is not None:
        if beta_schedule not in BETA_SCHEDULES:
            raise UserError(f"unknown beta_schedule '{beta_schedule}': choose one of {', '.join(BETA_SCHEDULES)}")
        config["beta_schedule"] = BETA_SCHEDULES[beta_schedule]
    return config


def make_scheduler(sampler: str, noise_config: dict):
    """A fresh diffusers scheduler of kind `sampler` on the prior's noise schedule, set for epsilon: the
    prior hands every sampler an epsilon prediction, whatever the model predicts."""
    import diffusers

    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler '{sampler}': choose one of {', '.join(SAMPLERS)}")
    name, extra = SAMPLERS[sampler]
    return getattr(diffusers, name).from_config(dict(noise_config), prediction_type="epsilon", **extra)
