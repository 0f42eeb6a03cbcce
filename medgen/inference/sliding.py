"""Sliding-window prediction over whole volumes with MONAI, blended with Gaussian weights.

The window (``roi``) and the number of windows per forward pass are chosen from the free GPU
memory, measured with one probe pass; on the CPU a fixed default is used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

CPU_ROI_VOX = (64, 64, 64)
CPU_BATCH = 2
_GPU_ROI_CANDIDATES = (256, 224, 192, 160, 128, 96, 64, 32)
_MAX_GPU_BATCH = 8


@dataclass(frozen=True)
class WindowPlan:
    """How a volume is cut into windows: window size (voxels) and windows per forward pass."""

    roi_vox: tuple[int, int, int]
    batch: int


def _round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def _fit_roi(roi: Sequence[int], shape: Sequence[int], multiple: int) -> tuple[int, int, int]:
    """Shrink ``roi`` to the volume (rounded up to ``multiple``) so small volumes pad little.

    Examples
    --------
    >>> _fit_roi((64, 64, 64), (100, 40, 7), 16)
    (64, 48, 16)
    """
    return tuple(int(min(r, _round_up(s, multiple))) for r, s in zip(roi, shape))  # type: ignore[return-value]


def autocast_context(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when ``enabled``; a no-op on the CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def plan_windows(
    predictor: Callable[[torch.Tensor], torch.Tensor],
    shape: Sequence[int],
    device: torch.device | str,
    *,
    in_channels: int = 1,
    multiple: int = 16,
    amp: bool = True,
    memory_fraction: float = 0.5,
    cpu_roi_vox: Sequence[int] = CPU_ROI_VOX,
    cpu_batch: int = CPU_BATCH,
) -> WindowPlan:
    """Choose the window size and batch for ``shape`` (D, H, W) on ``device``.

    On CUDA, one probe pass on a 32^3 window measures the peak memory per voxel; the largest
    cubic window (a multiple of ``multiple``) whose batch fits in ``memory_fraction`` of the
    free memory (``torch.cuda.mem_get_info``) is taken, then as many windows per pass as fit
    (up to 8). On the CPU: ``cpu_roi_vox`` and ``cpu_batch``.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return WindowPlan(_fit_roi(cpu_roi_vox, shape, multiple), int(cpu_batch))
    probe_size = 32
    probe = torch.zeros((1, in_channels, probe_size, probe_size, probe_size), device=device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.inference_mode(), autocast_context(device, amp):
        predictor(probe)
    torch.cuda.synchronize(device)
    bytes_per_voxel = max(torch.cuda.max_memory_allocated(device) - base, 1) / probe_size**3
    free_bytes, _ = torch.cuda.mem_get_info(device)
    budget = free_bytes * memory_fraction
    for side in _GPU_ROI_CANDIDATES:
        roi = _fit_roi((side, side, side), shape, multiple)
        window_bytes = bytes_per_voxel * float(np.prod(roi))
        if window_bytes <= budget:
            batch = int(max(1, min(_MAX_GPU_BATCH, budget // window_bytes)))
            return WindowPlan(roi, batch)
    return WindowPlan(_fit_roi((multiple,) * 3, shape, multiple), 1)


def sliding_window_predict(
    predictor: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    plan: WindowPlan,
    *,
    overlap: float = 0.25,
    device: torch.device | str = "cpu",
    amp: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Apply ``predictor`` window by window and blend the overlaps with Gaussian weights.

    Parameters
    ----------
    predictor : callable
        Maps a ``(b, C, *roi)`` window batch to a ``(b, C_out, *roi)`` prediction.
    image : torch.Tensor, shape (1, C, D, H, W)
        The whole input; it may stay on the CPU while windows run on ``device``.
    plan : WindowPlan
    overlap : float in [0, 1)
        Fraction of a window shared with its neighbour along each axis.

    Returns
    -------
    torch.Tensor, shape (1, C_out, D, H, W)
        float32, on the device of ``image``. Because the blending weights are normalised, a
        predictor that adds a constant returns the input plus that constant everywhere.
    """
    from monai.inferers import sliding_window_inference  # lazy: MONAI is heavy to import

    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"`overlap` must be in [0, 1), got {overlap}")
    device = torch.device(device)

    def run(window: torch.Tensor) -> torch.Tensor:
        with autocast_context(device, amp):
            return predictor(window).float()

    with torch.inference_mode():
        out = sliding_window_inference(
            image,
            roi_size=plan.roi_vox,
            sw_batch_size=plan.batch,
            predictor=run,
            overlap=overlap,
            mode="gaussian",
            padding_mode="replicate",
            sw_device=device,
            device=image.device,
            progress=progress,
        )
    return out.float()
