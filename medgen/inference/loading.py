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
    config = config_from_json(metadata["config"], source=str(path))
    network = build_model(config)
    try:
        network.load_state_dict(model_state_from_payload(payload, prefer_ema))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise InputError(path, f"weights do not match the stored config ({first})") from None
    network.to(torch.device(device)).eval()
    return LoadedModel(model=network, config=config, metadata=metadata, path=path, source=str(model))
