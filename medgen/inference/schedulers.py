"""Diffusion noise schedules from MONAI, built from plain values.

This module imports no model code (neither :mod:`medgen.models` nor MONAI networks), so a
sampler can be used with any network that predicts noise, ``v`` or the clean sample.
"""

from __future__ import annotations

from typing import Any


def _common(num_train_timesteps: int, schedule: str, prediction_type: str) -> dict[str, Any]:
    # clip_sample off: the diffused quantity (a residual, or a normalised image) is not
    # confined to [-1, 1].
    return {
        "num_train_timesteps": int(num_train_timesteps),
        "schedule": schedule,
        "prediction_type": prediction_type,
        "clip_sample": False,
    }


def training_scheduler(
    num_train_timesteps: int = 1000,
    schedule: str = "scaled_linear_beta",
    prediction_type: str = "v_prediction",
):
    """MONAI ``DDPMScheduler`` used to noise training samples (``add_noise``, ``get_velocity``)."""
    from monai.networks.schedulers import DDPMScheduler

    return DDPMScheduler(**_common(num_train_timesteps, schedule, prediction_type))


def sampling_scheduler(
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    schedule: str = "scaled_linear_beta",
    prediction_type: str = "v_prediction",
):
    """MONAI ``DDIMScheduler`` with ``num_inference_steps`` deterministic steps set."""
    from monai.networks.schedulers import DDIMScheduler

    if num_inference_steps < 1 or num_inference_steps > num_train_timesteps:
        raise ValueError(
            f"`num_inference_steps` must be in [1, {num_train_timesteps}], got {num_inference_steps}"
        )
    scheduler = DDIMScheduler(**_common(num_train_timesteps, schedule, prediction_type))
    scheduler.set_timesteps(int(num_inference_steps))
    return scheduler
