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


def check_steps(sampler: str, noise_config: dict, steps: int) -> None:
    """A one-line UserError for a step count the scheduler cannot lay out: more steps than training
    timesteps, or fewer than PNDM's 4 Runge-Kutta warm-up steps (unless the model's config skips them, as SD's)."""
    train = int(noise_config.get("num_train_timesteps", 1000))
    if steps > train:
        raise UserError(f"steps={steps} is more than the model's {train} training timesteps")
    if sampler == "pndm" and not noise_config.get("skip_prk_steps", False) and steps < 4:
        raise UserError(f"sampler=pndm needs steps >= 4 with this model's scheduler (its Runge-Kutta warm-up), got {steps}")


def make_scheduler(sampler: str, noise_config: dict, steps: int | None = None):
    """A fresh diffusers scheduler of kind `sampler` on the prior's noise schedule, set for epsilon: the
    prior hands every sampler an epsilon prediction, whatever the model predicts. With `steps`, first
    checks that it can lay them out (`check_steps`)."""
    import diffusers

    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler '{sampler}': choose one of {', '.join(SAMPLERS)}")
    if steps is not None:
        check_steps(sampler, noise_config, steps)
    name, extra = SAMPLERS[sampler]
    return getattr(diffusers, name).from_config(dict(noise_config), prediction_type="epsilon", **extra)
