"""Enhance a whole :class:`~medgen.volume.Volume`: normalise, (up-sample), predict, restore units.

The output lies on the input grid (or on the refined grid for super-resolution, with the
affine moved so that nothing shifts) and in the input's physical units: a CT in HU comes
back in HU. Diffusion models return the mean of several samples and their per-voxel
standard deviation (the uncertainty map) in the same units.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from medgen.inference.normalise import IntensityNorm
from medgen.inference.sliding import WindowPlan, plan_windows, sliding_window_predict
from medgen.volume import Volume, join_frames, split_frames

#: Diffusion samples per box in ``--adapt``'s SURE probe (:func:`box_predictor`): on a 112^3 MR
#: crop 2 gave the same adapted output as 4 (to 0.01 dB) in two thirds of the time.
PROBE_SAMPLES = 2


@dataclass
class EnhanceResult:
    """An enhanced volume, its uncertainty map (diffusion only) and how it was made."""

    volume: Volume
    uncertainty: Volume | None
    seconds: float
    plan: WindowPlan
    norm: IntensityNorm
    noise_level: float | None = None


def estimate_noise_level(normalised: np.ndarray, max_side_vox: int = 96) -> float:
    """Noise standard deviation of a 3D array: MAD of the finest diagonal Haar wavelet band.

    Donoho's estimator, ``median(|d|) / 0.6745`` over the orthonormal 3D Haar ``HHH``
    coefficients of 2x2x2 blocks (written out here because scikit-image's ``estimate_sigma``
    needs PyWavelets, which medgen does not depend on). Only a central block of at most
    ``max_side_vox`` per side is used, which bounds the time on large scans.

    Examples
    --------
    >>> noise = np.random.default_rng(0).normal(0.0, 0.1, (64, 64, 64))
    >>> round(estimate_noise_level(noise), 2)
    0.1
    """
    starts = [max((s - max_side_vox) // 2, 0) for s in normalised.shape[:3]]
    block = np.asarray(normalised[tuple(slice(b, b + max_side_vox) for b in starts)], np.float64)
    i, j, k = (n - n % 2 for n in block.shape)
    if min(i, j, k) < 2:
        return 0.0
    b = block[:i, :j, :k]
    d = b[0::2] - b[1::2]
    d = d[:, 0::2] - d[:, 1::2]
    d = (d[:, :, 0::2] - d[:, :, 1::2]) / np.sqrt(8.0)
    return float(np.median(np.abs(d)) / 0.6745)


def _size_multiple(model: nn.Module) -> int:
    """Window sides must be multiples of this (pooling depth of the network)."""
    levels = getattr(getattr(model, "net", None), "block_out_channels", None)
    if levels is not None:  # DiffusionModelUNet: one halving between consecutive levels
        return max(2 ** (len(levels) - 1), 1)
    return 16  # BasicUNet: four poolings


def _is_diffusion(model: nn.Module) -> bool:
    return hasattr(model, "prediction_type") and hasattr(model, "target")


def predict_array(
    model: nn.Module,
    normalised: np.ndarray,
    *,
    device: torch.device | str = "cpu",
    plan: WindowPlan | None = None,
    overlap: float = 0.25,
    amp: bool = True,
    noise_level: float | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, WindowPlan]:
    """Sliding-window prediction of a residual/direct model on one normalised 3D array.

    Parameters
    ----------
    model : nn.Module
        Called as ``model(x)`` (``model(x, noise_level)`` when ``noise_level`` is given) on
        ``(b, 1, *roi)`` windows; returns the same shape.
    normalised : np.ndarray, shape (I, J, K)

    Returns
    -------
    prediction : np.ndarray, shape (I, J, K), float32
    plan : WindowPlan
    """
    device = torch.device(device)
    model = model.to(device).eval()

    def predictor(window: torch.Tensor) -> torch.Tensor:
        return model(window) if noise_level is None else model(window, noise_level)

    if plan is None:
        plan = plan_windows(predictor, normalised.shape, device, multiple=_size_multiple(model), amp=amp)
    image = torch.from_numpy(np.ascontiguousarray(normalised, dtype=np.float32))[None, None]
    if device.type == "cuda":
        image = image.to(device)  # blend on the GPU too: far faster than on the host
    out = sliding_window_predict(
        predictor, image, plan, overlap=overlap, device=device, amp=amp, progress=progress
    )
    return out[0, 0].cpu().numpy(), plan


def sample_diffusion_array(
    model: nn.Module,
    normalised: np.ndarray,
    scheduler,
    *,
    n_samples: int,
    target_scale: float = 1.0,
    device: torch.device | str = "cpu",
    plan: WindowPlan | None = None,
    overlap: float = 0.25,
    amp: bool = True,
    noise_level: float | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, WindowPlan]:
    """Mean and per-voxel std of ``n_samples`` conditional diffusion samples (normalised units).

    Every DDIM step runs the network over the whole volume with sliding windows, so the
    samples have no seams at window borders.
    """
    from medgen.inference.sampling import sample_mean_std

    device = torch.device(device)
    model = model.to(device).eval()
    condition = torch.from_numpy(np.ascontiguousarray(normalised, dtype=np.float32))[None, None]
    t_now = {"t": 0}

    def window_predictor(window: torch.Tensor) -> torch.Tensor:
        timesteps = torch.full((window.shape[0],), t_now["t"], device=window.device, dtype=torch.long)
        return model(window[:, :1], timesteps, window[:, 1:2], noise_level)

    if plan is None:
        plan = plan_windows(
            window_predictor, normalised.shape, device, in_channels=2, multiple=_size_multiple(model), amp=amp
        )

    def predict(x_t: torch.Tensor, t: int) -> torch.Tensor:
        t_now["t"] = int(t)
        image = torch.cat([x_t.cpu(), condition], dim=1)
        return sliding_window_predict(window_predictor, image, plan, overlap=overlap, device=device, amp=amp)

    with torch.inference_mode():
        mean, std = sample_mean_std(
            predict, condition.shape, scheduler, n_samples, seed=seed, device="cpu", progress=progress
        )
    mean_np = mean[0, 0].numpy() / target_scale
    std_np = std[0, 0].numpy() / target_scale
    if model.target == "residual":
        mean_np = normalised + mean_np
    return mean_np.astype(np.float32), std_np.astype(np.float32), plan


def enhance_volume(
    model: nn.Module,
    volume: Volume,
    *,
    norm: IntensityNorm | None = None,
    norm_mode: str = "percentile",
    norm_lower: float = 0.5,
    norm_upper: float = 99.5,
    upsample_factor: Sequence[int] = (1, 1, 1),
    noise_conditioning: bool = False,
    noise_level: float | None = None,
    scheduler=None,
    n_samples: int = 4,
    target_scale: float = 1.0,
    device: torch.device | str = "cpu",
    plan: WindowPlan | None = None,
    overlap: float = 0.25,
    amp: bool = True,
    seed: int = 0,
    progress: bool = False,
    description: str = "enhanced by medgen",
) -> EnhanceResult:
    """Enhance every 3D frame of ``volume`` with ``model``.

    Parameters
    ----------
    model : nn.Module
        A residual/direct predictor (``unet``/``gan``) or a conditional diffusion denoiser
        (then ``scheduler`` must be a DDIM scheduler).
    volume : Volume
        3D or 4D; physical values (``volume.values()``) are what is normalised.
    norm : IntensityNorm, optional
        Fixed normalisation; by default fitted per volume with ``norm_mode``/``norm_lower``/
        ``norm_upper`` (see :meth:`IntensityNorm.fit`).
    upsample_factor : 3 ints
        Super-resolution: the input is first refined on a grid-aligned finer grid.
    noise_conditioning : bool
        Feed the noise level (``noise_level`` in normalised units, else estimated).

    Returns
    -------
    EnhanceResult
        ``volume``: float32 physical values on the output grid with the input's metadata
        (units unchanged) and a provenance line; ``uncertainty``: per-voxel std in the same
        units (diffusion), else None.
    """
    from medgen.inference.grid import fine_affine, upsample_grid_aligned

    started = time.perf_counter()
    values = volume.values(np.float32)
    if norm is None:
        norm = IntensityNorm.fit(values, norm_mode, norm_lower, norm_upper)
    frames = split_frames(values)
    factor = tuple(int(f) for f in upsample_factor)
    outputs, stds = [], []
    used_level = None
    for frame in frames:
        x = norm.forward(frame)
        if any(f != 1 for f in factor):
            x = upsample_grid_aligned(x, factor)
        level = None
        if noise_conditioning:
            level = float(noise_level) if noise_level is not None else estimate_noise_level(x)
            used_level = level
        if _is_diffusion(model):
            if scheduler is None:
                raise ValueError("`scheduler` is required for a diffusion model")
            mean, std, plan = sample_diffusion_array(
                model,
                x,
                scheduler,
                n_samples=n_samples,
                target_scale=target_scale,
                device=device,
                plan=plan,
                overlap=overlap,
                amp=amp,
                noise_level=level,
                seed=seed,
                progress=progress,
            )
            outputs.append(norm.inverse(mean))
            stds.append((std * norm.scale).astype(np.float32))
        else:
            pred, plan = predict_array(
                model,
                x,
                device=device,
                plan=plan,
                overlap=overlap,
                amp=amp,
                noise_level=level,
                progress=progress,
            )
            outputs.append(norm.inverse(pred))
    affine = fine_affine(volume.affine, factor) if any(f != 1 for f in factor) else volume.affine
    meta = volume.meta.copy()
    meta.provenance.append(description)
    out = Volume(join_frames(outputs), affine, meta)
    uncertainty = None
    if stds:
        u_meta = volume.meta.copy()
        u_meta.provenance.append(f"{description}: per-voxel standard deviation of {n_samples} samples")
        uncertainty = Volume(join_frames(stds), affine, u_meta)
    return EnhanceResult(
        volume=out,
        uncertainty=uncertainty,
        seconds=time.perf_counter() - started,
        plan=plan,
        norm=norm,
        noise_level=used_level,
    )


def enhance_with(loaded, volume: Volume, *, device: torch.device | str = "cpu", **kwargs) -> EnhanceResult:
    """:func:`enhance_volume` configured from a :class:`~medgen.inference.loading.LoadedModel`."""
    cfg = loaded.config
    n = cfg.data.normalisation
    options = {
        "norm_mode": n.mode,
        "norm_lower": n.lower,
        "norm_upper": n.upper,
        "upsample_factor": tuple(cfg.model.upsample_factor),
        "noise_conditioning": cfg.model.noise_conditioning,
        "description": f"enhanced by medgen {cfg.model.kind} model ({cfg.name})",
    }
    if cfg.model.kind == "diffusion":
        from medgen.inference.schedulers import sampling_scheduler

        d = cfg.model.diffusion
        options["scheduler"] = sampling_scheduler(
            d.sampling_steps, d.num_train_timesteps, d.schedule, d.prediction_type
        )
        options["n_samples"] = d.n_samples
        options["target_scale"] = d.target_scale
    options.update(kwargs)
    return enhance_volume(loaded.model, volume, device=device, **options)


def box_predictor(
    loaded, scan: Volume, result: EnhanceResult, *, device: torch.device | str = "cpu", overlap: float = 0.25, seed: int = 0
) -> Callable[[np.ndarray], np.ndarray]:
    """The model on any box of ``scan``'s voxels, treated as ``result`` treated the whole scan.

    For ``--adapt``'s SURE fit (:func:`medgen.adapt.with_model.adapt_with_model`): the box gets
    the whole scan's normalisation and noise level, and runs in float32 even on a GPU, because
    the fit takes the difference of two outputs whose inputs differ by a fraction of the noise,
    a change that bf16's ~3 significant digits would round away. A diffusion model draws at
    most :data:`PROBE_SAMPLES` samples per box: the fit uses only the change the probe makes,
    whose expectation over the sampler's noise is the same for any number of samples.
    """
    extra: dict[str, Any] = {}
    if loaded.config.model.kind == "diffusion":
        extra["n_samples"] = min(loaded.config.model.diffusion.n_samples, PROBE_SAMPLES)

    def predict(values: np.ndarray) -> np.ndarray:
        box = Volume(values, scan.affine, scan.meta)
        again = enhance_with(loaded, box, device=device, overlap=overlap, seed=seed, norm=result.norm,
                             noise_level=result.noise_level, amp=False, **extra)
        return again.volume.values(np.float32)

    return predict
