"""Synthesis from a normalizing flow over whole latent grids (``model.kind: flow`` with
``regions: null``): draw base noise, invert the flow in one exact pass to standardised
features, unstandardise them into a latent grid and decode it like latent diffusion does
(slab decoding included), marked synthetic.

Sample ``i`` of seed ``s`` draws its noise (and, for a class-conditioned flow asked for no
label, its label) from ``(s, first_index + i)`` alone, exactly as latent diffusion does, so it
is the same volume whatever ``n`` is. ``temperature`` scales the base noise: 1 samples the
learnt density, below 1 trades diversity for fidelity, 0 gives the flow's image of the base
mode (one volume whatever the seed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medgen.data.synthesis_data import SynthesisSpec
from medgen.inference.synthesis import (
    LABEL_KEY,
    SynthesisRequest,
    _sample_seed,
    decode_latents,
    resolve_condition,
    synthetic_volume,
)
from medgen.validate import ParameterError, check_int, check_non_negative
from medgen.volume import Volume

FLOW_SAMPLER = "flow"


@dataclass
class FlowSettings:
    """A flow's sampling defaults.

    A flow samples in one exact inverse pass: there is no sampler to choose, no steps and no
    guidance. ``sampler``/``steps``/``guidance_scale`` hold the only values a flow takes, so
    code serving both families (``SyntheticDataset``, ``medgen synthesize``) reads them alike.
    """

    temperature: float = 1.0
    sampler: str = FLOW_SAMPLER
    steps: int = 1
    guidance_scale: float = 1.0  # 1 = no guidance


@dataclass(frozen=True)
class FlowResolved:
    """A flow request checked: the label (None: none given) and the noise temperature."""

    label: int | None
    temperature: float


def resolve_flow_request(settings: FlowSettings, spec: SynthesisSpec, request: SynthesisRequest) -> FlowResolved:
    """Check ``request`` against a flow.

    Diffusion options are refused unless they are what a flow does anyway (sampler "flow",
    1 step, guidance 1): silently dropping them would hide a mistaken model choice.

    Raises
    ------
    ParameterError
        A diffusion option, a bad condition, a negative or non-finite temperature.
    """
    one_pass = "does not apply to a flow model: it samples in one exact pass"
    if request.sampler not in (None, FLOW_SAMPLER):
        raise ParameterError(f"`sampler` {request.sampler!r} {one_pass}; leave `sampler` out")
    if request.steps is not None and request.steps != 1:
        raise ParameterError(f"`steps` {one_pass}; leave `steps` out (got {request.steps})")
    if request.guidance_scale is not None and float(request.guidance_scale) != 1.0:
        raise ParameterError(f"`guidance_scale` does not apply to a flow model; leave it out (got {request.guidance_scale})")
    label, _ = resolve_condition(spec, request.condition)  # flows take no covariates
    temperature = settings.temperature if request.temperature is None else request.temperature
    return FlowResolved(label, check_non_negative("temperature", temperature))


def _prior_label(model: nn.Module, seed: int, index: int) -> int:
    """A class-conditioned flow asked for no label: one drawn from the training class
    frequencies (the mixture the flow scores with), on the sample's own seed stream."""
    generator = torch.Generator().manual_seed(_sample_seed(seed, index, 1))
    return int(torch.multinomial(model.class_log_prior.detach().float().cpu().exp(), 1, generator=generator))


@torch.no_grad()
def sample_flow_latents(model: nn.Module, seed: int, index: int, temperature: float, label: int | None,
                        device: torch.device) -> torch.Tensor:  # fmt: skip
    """Unscaled latents ``(1, C, d, h, w)`` of sample ``index`` of ``seed``."""
    generator = torch.Generator().manual_seed(_sample_seed(seed, index))
    noise = torch.randn((1, model.dim), generator=generator, dtype=torch.float32) * temperature
    labels = None if label is None else torch.tensor([label], dtype=torch.long, device=device)
    return model.latents_from_features(model.sample_features(noise.to(device), labels))


def generate_flow_volumes(
    model: nn.Module,
    settings: FlowSettings,
    spec: SynthesisSpec,
    request: SynthesisRequest,
    *,
    device: torch.device | str = "cpu",
    source: str = "",
    slab_latent_vox: int | None = None,
    progress: bool = False,  # noqa: ARG001 (one pass per sample: nothing to show)
) -> list[Volume]:
    """``request.n`` synthetic volumes from a decodable :class:`~medgen.models.flow.LatentFlow`.

    Raises
    ------
    ParameterError
        See :func:`resolve_flow_request`; a flow over pooled regions (not decodable).
    """
    n = check_int("n", request.n, minimum=1)
    resolved = resolve_flow_request(settings, spec, request)
    if not model.decodable:
        raise ParameterError("a flow over pooled latent regions cannot be decoded; train one with `regions: null`")
    device = torch.device(device)
    model = model.to(device).eval()
    volumes = []
    for i in range(n):  # one at a time: a batch could change a sample's floating-point sums
        index = request.first_index + i
        drawn = resolved.label is None and model.num_classes > 0
        label = _prior_label(model, request.seed, index) if drawn else resolved.label
        latents = sample_flow_latents(model, request.seed, index, resolved.temperature, label, device)
        image = decode_latents(model, latents, slab_latent_vox=slab_latent_vox)[0, 0]
        record = {
            "model": source,
            "seed": int(request.seed),
            "index": int(index),
            "condition": {LABEL_KEY: label} if label is not None else {},
            "sampler": FLOW_SAMPLER,
            "steps": 1,
            "temperature": resolved.temperature,
        }
        if drawn:
            record["label_from_class_prior"] = True
        volumes.append(synthetic_volume(image.float().cpu().numpy(), spec, record, f"synthetic-s{request.seed}-{index:05d}"))
    return volumes
