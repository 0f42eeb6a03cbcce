"""From a model file or MLflow model URI to a ready network and what it needs to run."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medgen.config import PipelineConfig, config_from_json
from medgen.errors import InputError


@dataclass
class LoadedModel:
    """A network in eval mode with the config that built it.

    ``metadata`` holds the JSON facts stored at training time (``config``, ``data_hash``,
    ``step``, ...); ``path`` is the local model file that was read.
    """

    model: nn.Module
    config: PipelineConfig
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    source: str = ""

    @property
    def kind(self) -> str:
        return self.config.model.kind


def _ema_weights(ema_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``AveragedModel`` state (``module.*`` + ``n_averaged``) -> the plain model's state."""
    return {k[len("module.") :]: v for k, v in ema_state.items() if k.startswith("module.")}


def model_state_from_payload(payload: dict[str, Any], prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """Weights to apply: a model file's weights, or a training checkpoint's EMA (or raw) ones."""
    if prefer_ema and payload.get("ema") is not None:
        return _ema_weights(payload["ema"])
    return payload["model"]


def load_model(
    model: str | Path,
    *,
    device: str | torch.device = "cpu",
    tracking_uri: str | None = None,
    prefer_ema: bool = True,
) -> LoadedModel:
    """Rebuild the network stored in ``model``.

    Parameters
    ----------
    model : str or Path
        A model file (``model.pt`` from training), a training checkpoint (``step-*.pt``,
        ``last.pt``; EMA weights are used when present), a folder holding ``model.pt``, or an
        MLflow URI ``runs:/<run_id>/model`` / ``models:/<name>/<version>``.
    device : str or torch.device
    tracking_uri : str, optional
        MLflow tracking URI for model URIs (default ``$MLFLOW_TRACKING_URI`` or the local
        SQLite store).

    Raises
    ------
    InputError
        The file is missing, not a medgen checkpoint, or its weights do not fit its config.
    """
    from medgen.models import build_model
    from medgen.tracking import resolve_model_uri
    from medgen.training.checkpoint import load_checkpoint

    path = resolve_model_uri(model, tracking_uri=tracking_uri)
    payload = load_checkpoint(path)
    try:
        metadata = json.loads(payload.get("metadata_json") or "{}")
    except json.JSONDecodeError:
        raise InputError(path, "checkpoint metadata is not valid JSON") from None
    if "config" not in metadata:
        raise InputError(path, "checkpoint metadata has no 'config': cannot rebuild the network")
    metadata.setdefault("step", int(payload.get("step", 0)))  # stored beside the JSON, not in it
    config = config_from_json(metadata["config"], source=str(path))
    network = build_model(config)
    try:
        network.load_state_dict(model_state_from_payload(payload, prefer_ema))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise InputError(path, f"weights do not match the stored config ({first})") from None
    network.to(torch.device(device)).eval()
    return LoadedModel(model=network, config=config, metadata=metadata, path=path, source=str(model))


@dataclass
class SynthesisModel:
    """A synthesis model ready to generate: network, sampling settings and what it makes
    (grid, units, conditions). ``source`` is how the user named it.

    Latent diffusion (``settings``: :class:`~medgen.inference.synthesis.DiffusionSettings`)
    or a decodable normalizing flow (:class:`~medgen.inference.flow_synthesis.FlowSettings`);
    :meth:`check` and :meth:`generate` serve both.
    """

    model: nn.Module
    settings: Any  # DiffusionSettings or FlowSettings
    spec: Any  # medgen.data.synthesis_data.SynthesisSpec
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def is_flow(self) -> bool:
        from medgen.inference.flow_synthesis import FlowSettings

        return isinstance(self.settings, FlowSettings)

    def check(self, request) -> None:
        """Raise ``ParameterError`` for a request this model cannot serve, before any work."""
        if self.is_flow:
            from medgen.inference.flow_synthesis import resolve_flow_request

            resolve_flow_request(self.settings, self.spec, request)
        else:
            from medgen.inference.synthesis import check_request

            check_request(self.settings, self.spec, request)

    def generate(self, request, *, device="cpu", slab_latent_vox: int | None = None, progress: bool = False):
        """Volumes for ``request`` (:class:`medgen.inference.synthesis.SynthesisRequest`)."""
        if self.is_flow:
            from medgen.inference.flow_synthesis import generate_flow_volumes as generate
        else:
            from medgen.inference.synthesis import generate_volumes as generate

        return generate(
            self.model, self.settings, self.spec, request, device=device, source=self.source,
            slab_latent_vox=slab_latent_vox, progress=progress,
        )  # fmt: skip


def article(kind: str) -> str:
    """``"an autoencoder"``, ``"a unet"``: the kind with its article."""
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}"


def is_bundle_folder(path: str | Path) -> bool:
    """A MONAI model-zoo bundle: a folder with ``configs/`` (JSON) and ``models/``."""
    p = Path(path)
    return p.is_dir() and (p / "configs").is_dir()


def load_synthesis_model(
    model: str | Path, *, device: str | torch.device = "cpu", tracking_uri: str | None = None
) -> SynthesisModel:
    """A synthesis model from a medgen model file/URI (``latent_diffusion``, or ``flow``
    over the whole latent grid) or a local MONAI bundle folder
    (:func:`medgen.models.bundle.load_bundle`).

    Raises
    ------
    InputError
        Not a synthesis model, a flow over pooled regions (it cannot be decoded), or a
        bundle without what it needs.
    """
    from medgen.data.synthesis_data import SynthesisSpec
    from medgen.inference.flow_synthesis import FlowSettings
    from medgen.inference.synthesis import DiffusionSettings

    if is_bundle_folder(model):
        return load_bundle(model, device=device)
    loaded = load_model(model, device=device, tracking_uri=tracking_uri)
    where = loaded.path or model
    if loaded.kind not in ("latent_diffusion", "flow"):
        raise InputError(where, f"is {article(loaded.kind)} model, not a synthesis (latent_diffusion or flow) model")
    if loaded.kind == "flow" and not loaded.model.decodable:
        raise InputError(where, "is a flow over pooled latent regions (an input gate) and cannot be decoded into "
                                "volumes; train a flow with `model.flow.regions: null` to synthesize")  # fmt: skip
    spec = loaded.metadata.get("synthesis")
    if not spec:
        raise InputError(where, "has no synthesis metadata (grid, units): was it trained by medgen?")
    return SynthesisModel(
        model=loaded.model,
        settings=FlowSettings() if loaded.kind == "flow" else DiffusionSettings.from_config(loaded.config),
        spec=SynthesisSpec.from_dict(spec),
        source=str(model),
        metadata=loaded.metadata,
    )


def load_bundle(path: str | Path, *, device: str | torch.device = "cpu") -> SynthesisModel:
    """A :class:`SynthesisModel` from a local MONAI latent diffusion bundle folder
    (:func:`medgen.models.bundle.read_bundle` builds its networks and loads its weights).

    Covariates are named after the bundle's conditioning values (``gender``, ``age``,
    ``ventricular_vol``, ``brain_vol`` for the brain bundle), each taking [0, 1] with the
    bundle's own defaults; volumes come out in the bundle's value range, units "arbitrary".
    """
    from medgen.data.synthesis_data import SynthesisSpec
    from medgen.inference.synthesis import DiffusionSettings
    from medgen.models.bundle import SCHEDULE_ARGS, read_bundle
    from medgen.models.latent_diffusion import LatentDiffusionModel

    contents = read_bundle(path, device=device)
    model = LatentDiffusionModel(contents.autoencoder, contents.denoiser)
    model.scale_factor.fill_(contents.scale_factor)
    model.to(torch.device(device)).eval()
    sched = contents.scheduler
    settings = DiffusionSettings(
        training="ddpm",
        num_train_timesteps=int(sched.get("num_train_timesteps", 1000)),
        schedule=str(sched.get("schedule", "linear_beta")),  # MONAI's default, as the bundle would get
        prediction_type=str(sched.get("prediction_type", "epsilon")),
        sampler=contents.sampler,
        steps=contents.steps,
        schedule_args={k: float(sched[k]) for k in SCHEDULE_ARGS if isinstance(sched.get(k), (int, float))},
    )
    lo, hi = contents.value_range
    spec = SynthesisSpec(
        shape_vox=contents.shape_vox,
        spacing_mm=contents.spacing_mm,
        intensity_offset=lo,
        intensity_scale=hi - lo,
        units="arbitrary",
        modality=contents.modality,
        num_classes=0,
        covariates=contents.covariates,
        covariate_ranges={name: [0.0, 1.0] for name in contents.covariates},
        covariate_defaults=dict(contents.covariate_defaults),
        latent_shape=contents.latent_shape,
    )
    metadata = {"format": "monai-bundle", "bundle": contents.metadata}
    return SynthesisModel(model=model, settings=settings, spec=spec, source=str(path), metadata=metadata)
