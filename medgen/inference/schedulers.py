"""Diffusion noise schedules from MONAI, built from plain values.

This module imports no model code (neither :mod:`medgen.models` nor MONAI networks), so a
sampler can be used with any network that predicts noise, ``v`` or the clean sample.
"""

from __future__ import annotations

from typing import Any


def _common(num_train_timesteps: int, schedule: str, prediction_type: str, **schedule_args: float) -> dict[str, Any]:
    # clip_sample off: the diffused quantity (a residual, a normalised image, a latent) is
    # not confined to [-1, 1]. ``schedule_args``: e.g. ``beta_start``/``beta_end``.
    return {
        "num_train_timesteps": int(num_train_timesteps),
        "schedule": schedule,
        "prediction_type": prediction_type,
        "clip_sample": False,
        **schedule_args,
    }


def training_scheduler(
    num_train_timesteps: int = 1000,
    schedule: str = "scaled_linear_beta",
    prediction_type: str = "v_prediction",
    **schedule_args: float,
):
    """MONAI ``DDPMScheduler`` used to noise training samples (``add_noise``, ``get_velocity``)."""
    from monai.networks.schedulers import DDPMScheduler

    return DDPMScheduler(**_common(num_train_timesteps, schedule, prediction_type, **schedule_args))


def sampling_scheduler(
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    schedule: str = "scaled_linear_beta",
    prediction_type: str = "v_prediction",
    **schedule_args: float,
):
    """MONAI ``DDIMScheduler`` with ``num_inference_steps`` deterministic steps set."""
    from monai.networks.schedulers import DDIMScheduler

    _check_steps(num_inference_steps, num_train_timesteps)
    scheduler = DDIMScheduler(**_common(num_train_timesteps, schedule, prediction_type, **schedule_args))
    scheduler.set_timesteps(int(num_inference_steps))
    return scheduler


def rflow_scheduler(num_train_timesteps: int = 1000, num_inference_steps: int | None = None):
    """MONAI ``RFlowScheduler`` (rectified flow, velocity prediction), with
    ``num_inference_steps`` Euler steps set when given."""
    from monai.networks.schedulers import RFlowScheduler

    scheduler = RFlowScheduler(num_train_timesteps=int(num_train_timesteps), use_discrete_timesteps=True)
    if num_inference_steps is not None:
        _check_steps(num_inference_steps, num_train_timesteps)
        scheduler.set_timesteps(int(num_inference_steps))
    return scheduler


def ddpm_sampling_scheduler(
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    schedule: str = "scaled_linear_beta",
    prediction_type: str = "epsilon",
    **schedule_args: float,
):
    """MONAI ``DDPMScheduler`` with ``num_inference_steps`` ancestral (stochastic) steps set."""
    _check_steps(num_inference_steps, num_train_timesteps)
    scheduler = training_scheduler(num_train_timesteps, schedule, prediction_type, **schedule_args)
    scheduler.set_timesteps(int(num_inference_steps))
    return scheduler


def _check_steps(num_inference_steps: int, num_train_timesteps: int) -> None:
    if num_inference_steps < 1 or num_inference_steps > num_train_timesteps:
        raise ValueError(
            f"`num_inference_steps` must be in [1, {num_train_timesteps}], got {num_inference_steps}"
        )
