"""Noise schedules and samplers, taken from diffusers by name (never re-implemented).

`make_scheduler("dpm++", prior.noise_config)` builds a diffusers scheduler from the model's own
scheduler config, so the training schedule (number of steps, beta range) is kept and only the
sampler changes. `beta_schedule_config` swaps the beta schedule when the user asks for another.
"""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)

from .errors import UserError

SAMPLERS = {
    "ddim": (DDIMScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "euler": (EulerDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
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
    """A fresh diffusers scheduler of kind `sampler` on the prior's noise schedule (`Prior.noise_config`).

    The prior always hands the scheduler an epsilon prediction (v-models are converted in
    `Prior.predict_noise`), so the sampler is configured for epsilon whatever the model predicts.
    """
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler '{sampler}': choose one of {', '.join(SAMPLERS)}")
    cls, extra = SAMPLERS[sampler]
    return cls.from_config(dict(noise_config), prediction_type="epsilon", **extra)
