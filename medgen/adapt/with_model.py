"""``medgen enhance --adapt``: adapt a trained model's enhancement to the scan at hand.

* **Denoising models**: the network's output joins the non-local features of
  :func:`medgen.adapt.denoise.adapt_denoise` as one more feature, and SURE fits on the noisy
  scan itself how much of each to use per intensity and edge band. A network that does not
  suit the scan gets little weight; one that does gets more than the classical features.
  The noise model (Rician or Gaussian) comes from the model's training degradations, the
  noise sigma is estimated from the scan.
* **Super-resolution models**: the model's config gives the slice axis and factor; a
  sub-slice network is trained on the scan's own in-plane detail for the step budget
  (``--adapt-steps``; ``--adapt SECONDS`` is a clock budget, or only a safety cap when a
  step budget is given) (:func:`medgen.adapt.super_resolution.adapt_super_resolution`, the
  SMORE idea) and makes the output, which keeps exact consistency with the acquired thick
  slices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medgen.validate import ParameterError
from medgen.volume import Volume, VolumeMeta, join_frames, split_frames

__all__ = ["AdaptedResult", "adapt_with_model", "noise_kind_of", "slice_upsampling_of"]

RICIAN_DEGRADATIONS = ("rician",)


@dataclass
class AdaptedResult:
    """The adapted volume and what each frame's adaptation did (``records``, for MLflow)."""

    volume: Volume
    records: list[dict[str, Any]] = field(default_factory=list)

    def sidecar_entry(self) -> dict[str, Any]:
        """What the sidecar says about the adaptation (``"Adaptation"``; all frames together).

        ``StepsRun`` is the fewest steps any frame ran; ``BelowMinimumSteps`` is true when any
        frame ran fewer than ``StepsMinimum`` (its output may be no better than the start).

        Examples
        --------
        >>> r = AdaptedResult(None, [{"method": "smore", "steps": 30, "params": {"steps_budget": 30,
        ...     "seconds_cap": None, "steps_minimum": 200, "below_minimum_steps": True, "stopped_by": "steps"}}])
        >>> e = r.sidecar_entry()
        >>> e["Method"], e["StepsRun"], e["StepsBudget"], e["BelowMinimumSteps"], e["StoppedBy"]
        ('smore', 30, 30, True, 'steps')
        """
        first = self.records[0] if self.records else {}
        params = [r.get("params", {}) for r in self.records] or [{}]
        entry: dict[str, Any] = {
            "Method": first.get("method", ""),
            "StepsRun": min(int(r.get("steps", 0)) for r in self.records) if self.records else 0,
            "StepsBudget": params[0].get("steps_budget"),
            "SecondsCap": params[0].get("seconds_cap"),
            "StepsMinimum": params[0].get("steps_minimum"),
            "BelowMinimumSteps": any(bool(p.get("below_minimum_steps")) for p in params),
            "StoppedBy": params[0].get("stopped_by"),
        }
        if "noise_sigma" in params[0]:
            entry["NoiseSigmaEstimated"] = params[0]["noise_sigma"]
        return entry


def noise_kind_of(config) -> str:
    """``"rician"`` if the model was trained on Rician noise, else ``"gaussian"``."""
    names = {d.name for d in config.degradations}
    return "rician" if names & set(RICIAN_DEGRADATIONS) else "gaussian"


def slice_upsampling_of(config) -> tuple[int, int]:
    """``(factor, axis)`` of a through-plane super-resolution model's ``upsample_factor``.

    Examples
    --------
    >>> from types import SimpleNamespace as NS
    >>> slice_upsampling_of(NS(model=NS(upsample_factor=[1, 1, 2]), name="sr"))
    (2, 2)
    """
    factors = [int(f) for f in config.model.upsample_factor]
    refined = [a for a, f in enumerate(factors) if f != 1]
    if len(refined) != 1:
        raise ParameterError(
            f"--adapt for super-resolution needs a model that refines one axis; "
            f"model {config.name!r} has upsample_factor {factors}"
        )
    return factors[refined[0]], refined[0]


def adapt_with_model(
    loaded,
    volume: Volume,
    enhanced: Volume,
    seconds: float | None,
    *,
    max_steps: int | None = None,
    predict: Callable[[np.ndarray], np.ndarray],
    seed: int = 0,
    device: Any = "cpu",
    log: Callable[[str], None] | None = None,
) -> AdaptedResult:
    """Adapt ``loaded``'s enhancement of ``volume`` (already ``enhanced``) to the scan.

    Parameters
    ----------
    loaded : LoadedModel
        The trained model and its config.
    volume, enhanced : Volume
        The input scan and the model's plain output (same grid for denoising).
    seconds : float > 0 or None
        Clock budget of super-resolution training: the budget itself without ``max_steps``,
        only a safety cap with it; None: no clock. (The denoising fit is a fixed amount of
        work, see :func:`~medgen.adapt.denoise.adapt_denoise`; any budget runs it.)
    max_steps : int >= 1, optional
        Step budget of super-resolution training (``--adapt-steps``): it rules when given.
    predict : callable
        The model on a 3D array in physical units (same normalisation as the whole scan).
    seed : int
    device : str or torch.device
        Where the super-resolution network trains.
    log : callable, optional

    Returns
    -------
    AdaptedResult
        A volume on ``enhanced``'s grid with its metadata.
    """
    cfg = loaded.config
    spacing = volume.spacing_mm
    inputs = split_frames(volume.values(np.float32))
    model_outputs = split_frames(enhanced.values(np.float32))
    outputs, records = [], []
    if cfg.model.task == "denoise":
        from medgen.adapt.denoise import adapt_denoise

        noise = noise_kind_of(cfg)
        for x, model_output in zip(inputs, model_outputs):
            rec: dict[str, Any] = {}
            outputs.append(
                adapt_denoise(
                    # Any positive budget runs the (fixed-work) SURE fit.
                    x, spacing, noise_sigma=None, noise=noise, seconds=seconds or 1.0, seed=seed, log=log,
                    record=rec, extra_estimates=[predict], extra_outputs=[model_output],
                )
            )
            records.append(rec)
    else:
        from medgen.adapt.super_resolution import adapt_super_resolution

        factor, axis = slice_upsampling_of(cfg)
        for x in inputs:
            rec = {}
            outputs.append(
                adapt_super_resolution(
                    x, spacing, factor=factor, axis=axis, seconds=seconds, max_steps=max_steps, seed=seed,
                    log=log, record=rec, device=device,
                )
            )
            records.append(rec)
    values = join_frames(outputs)
    if values.shape != enhanced.shape:
        raise ParameterError(f"adapted output {values.shape} does not match the model's grid {enhanced.shape}")
    meta: VolumeMeta = enhanced.meta.copy()
    entry = AdaptedResult(enhanced, records).sidecar_entry()
    budget = f"{entry['StepsRun']} steps" if cfg.model.task != "denoise" else "closed-form SURE fit"
    meta.provenance.append(f"adapted to the scan: {entry['Method']}, {budget}")
    meta.acquisition["Adaptation"] = entry  # becomes the sidecar's "Adaptation"
    return AdaptedResult(Volume(values.astype(np.float32), enhanced.affine, meta), records)
