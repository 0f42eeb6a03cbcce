"""MLflow tracking: the only module of medgen that imports ``mlflow`` (lazily).

Everything goes through an explicit :class:`mlflow.tracking.MlflowClient` and explicit run
ids; the process-global "active run" of ``mlflow.start_run`` is never used, so stages may run
side by side and nest under a pipeline's parent run.

Where runs go: ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///mlflow.db`` in the current
working directory (artifacts beside it in ``mlruns/``). Open the UI with
``mlflow ui --backend-store-uri sqlite:///mlflow.db``.

No patient identifiers: parameter and tag keys naming DICOM patient attributes
(``PatientName``, ``PatientID``, ...; see :func:`medgen.io.sidecar.is_phi_key`) are refused.

Examples
--------
>>> flatten_config({"model": {"kind": "unet", "features": [8, 16]}, "seed": 0})
{'model.kind': 'unet', 'model.features': '[8, 16]', 'seed': 0}
"""

from __future__ import annotations

import atexit
import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MODEL_ARTIFACT_DIR = "model"
MODEL_FILE = "model.pt"
MODEL_META_FILE = "medgen_model.json"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
_BATCH = 100  # MLflow accepts at most 100 params / 1000 metrics per log_batch call
_MAX_PARAM_CHARS = 6000
_DOWNLOADS: dict[int, Path] = {}  # process id -> its folder of downloaded models

__all__ = [
    "DEFAULT_TRACKING_URI",
    "RunHandle",
    "Tracker",
    "check_no_phi",
    "default_tracking_uri",
    "flatten_config",
    "is_model_uri",
    "resolve_model_uri",
    "table_columns",
]


def _mlflow():
    """Import MLflow on first use (it takes seconds), with telemetry off unless asked for."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    return mlflow


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///mlflow.db`` (relative to the CWD)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def flatten_config(config: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested mappings -> one level with dotted keys; lists become JSON strings.

    Parameters
    ----------
    config : mapping
        E.g. ``PipelineConfig.model_dump(mode="json")``.

    Returns
    -------
    dict
        ``{"training.lr": 0.0002, "model.unet.features": "[8, 8, 16, 32, 64, 8]", ...}``;
        scalars are kept as they are, ``None`` stays ``None``.
    """
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            if value:
                flat.update(flatten_config(value, name, sep))
            else:
                flat[name] = "{}"
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(list(value))
        elif isinstance(value, Path):
            flat[name] = str(value)
        else:
            flat[name] = value
    return flat


def check_no_phi(keys: Any, what: str = "params") -> None:
    """Refuse keys that name patient attributes, in any dotted component.

    Raises
    ------
    ValueError
        ``"`params` must not name patient identifiers, got 'dicom.PatientName'"``.

    Examples
    --------
    >>> check_no_phi(["training.lr", "model.kind"])
    >>> check_no_phi(["source.PatientName"])
    Traceback (most recent call last):
    ...
    ValueError: `params` must not name patient identifiers, got 'source.PatientName'
    """
    from medgen.io.sidecar import is_phi_key

    for key in keys:
        parts = str(key).replace("/", ".").split(".")
        if any(is_phi_key(part) for part in parts) or is_phi_key(str(key)):
            raise ValueError(f"`{what}` must not name patient identifiers, got '{key}'")


def table_columns(data: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Columns of a table given as columns or as rows (missing cells become ``None``).

    Numpy scalars become Python numbers.

    Examples
    --------
    >>> table_columns([{"method": "nlm", "psnr": 30.5}, {"method": "unet", "ssim": 0.9}])
    {'method': ['nlm', 'unet'], 'psnr': [30.5, None], 'ssim': [None, 0.9]}
    """
    if isinstance(data, Mapping):
        columns = {str(k): [_plain(v) for v in values] for k, values in data.items()}
    else:
        names: dict[str, None] = {}
        for row in data:
            names.update(dict.fromkeys(str(k) for k in row))
        columns = {k: [_plain(row.get(k)) for row in data] for k in names}
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
        raise ValueError(f"`data` columns must have one length, got lengths {sorted(lengths)}")
    return columns


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _csv_text(columns: Mapping[str, Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(list(columns))
    writer.writerows(zip(*columns.values(), strict=True))
    return buf.getvalue()


def _param_value(value: Any) -> str:
    text = (
        value
        if isinstance(value, str)
        else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    )
    return text if len(text) <= _MAX_PARAM_CHARS else text[: _MAX_PARAM_CHARS - 3] + "..."


def _sqlite_artifact_root(uri: str) -> str | None:
    """For ``sqlite:///path/mlflow.db``: ``file:///path/mlruns`` (artifacts beside the DB)."""
    if not uri.startswith("sqlite:///"):
        return None
    db_path = Path(unquote(uri[len("sqlite:///") :]))
    if str(db_path) in ("", ":memory:"):
        return None
    return (db_path.expanduser().resolve().parent / "mlruns").as_uri()


class Tracker:
    """Log runs of one MLflow experiment through an explicit client.

    Parameters
    ----------
    experiment : str
        Experiment name; created on first use.
    uri : str, optional
        Tracking URI; default :func:`default_tracking_uri`.
    artifact_location : str, optional
        Where a *new* experiment stores artifacts. Default: beside the database for SQLite
        stores (``<db folder>/mlruns/<experiment>``), the server's choice otherwise.
    """

    def __init__(
        self, experiment: str = "medgen", uri: str | None = None, artifact_location: str | None = None
    ) -> None:
        if not experiment or not experiment.strip():
            raise ValueError("`experiment` must be a non-empty name, got ''")
        self.experiment = experiment
        self.uri = uri or default_tracking_uri()
        self._artifact_location = artifact_location
        self._client = None
        self._experiment_id: str | None = None

    # -- plumbing --------------------------------------------------------------------
    @property
    def client(self):
        """The :class:`mlflow.tracking.MlflowClient` (created on first use)."""
        if self._client is None:
            mlflow = _mlflow()
            self._client = mlflow.tracking.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment)
            if found is not None:
                self._experiment_id = found.experiment_id
            else:
                location = self._artifact_location
                if location is None:
                    root = _sqlite_artifact_root(self.uri)
                    if root is not None:
                        from medgen.io.deid import safe_name

                        location = f"{root}/{safe_name(self.experiment, empty='experiment')}"
                self._experiment_id = self.client.create_experiment(
                    self.experiment, artifact_location=location
                )
        return self._experiment_id

    # -- runs ------------------------------------------------------------------------
    def start_run(
        self, name: str, parent_id: str | None = None, tags: Mapping[str, Any] | None = None
    ) -> str:
        """Create a run (nested under ``parent_id`` if given); return its run id."""
        tags = dict(tags or {})
        check_no_phi(tags, "tags")
        if parent_id is not None:
            tags["mlflow.parentRunId"] = parent_id
        tags.setdefault("mlflow.source.name", "medgen")
        run = self.client.create_run(
            self.experiment_id, run_name=name, tags={k: str(v) for k, v in tags.items()}
        )
        return run.info.run_id

    def reopen_run(self, run_id: str) -> bool:
        """Mark an existing run of this store as running again (a resumed training);
        False if the store has no such run."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        self.client.update_run(run_id, status="RUNNING")
        return True

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Close a run as ``FINISHED``, ``FAILED`` or ``KILLED``."""
        if status not in RUN_STATUSES:
            raise ValueError(f"`status` must be one of {', '.join(RUN_STATUSES)}, got {status!r}")
        self.client.set_terminated(run_id, status=status)

    @contextmanager
    def run(
        self, name: str, parent_id: str | None = None, tags: Mapping[str, Any] | None = None
    ) -> Iterator[RunHandle]:
        """A run that ends ``FINISHED``, or ``FAILED`` (``KILLED`` on Ctrl-C) if the block raises."""
        run_id = self.start_run(name, parent_id=parent_id, tags=tags)
        status = "FAILED"
        try:
            yield RunHandle(self, run_id)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.end_run(run_id, status)

    # -- logging ---------------------------------------------------------------------
    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        check_no_phi(tags, "tags")
        for key, value in tags.items():
            self.client.set_tag(run_id, key, str(value))

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log a flat dict of parameters (see :func:`flatten_config`)."""
        check_no_phi(params, "params")
        from mlflow.entities import Param

        items = [Param(str(k), _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, params=items[i : i + _BATCH])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log scalar metrics at ``step``; non-finite values are skipped."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(str(k), float(v), now, int(step or 0))
            for k, v in metrics.items()
            if v is not None and np.isfinite(float(v))
        ]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i : i + 1000])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a local file or folder into the run's artifacts."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_dict(self, run_id: str, data: Mapping[str, Any], artifact_file: str) -> None:
        self.client.log_dict(run_id, dict(data), artifact_file)

    def log_table(
        self,
        run_id: str,
        data: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
        artifact_file: str,
        csv_file: str | None = None,
    ) -> None:
        """Log a table (``mlflow.log_table``: the UI shows it as a sortable table).

        Parameters
        ----------
        data : mapping of column -> values, or sequence of row mappings
            See :func:`table_columns`. Column names must not name patient attributes.
        artifact_file : str
            A ``.json`` path inside the run's artifacts, e.g. ``"evaluate/table.json"``.
        csv_file : str, optional
            Also log the table as CSV at this artifact path (for spreadsheets).
        """
        if not str(artifact_file).endswith(".json"):
            raise ValueError(f"`artifact_file` must end in .json, got {artifact_file!r}")
        columns = table_columns(data)
        check_no_phi(columns, "table columns")
        import warnings

        with warnings.catch_warnings():  # MLflow's own use of pandas 3, nothing of ours
            warnings.filterwarnings("ignore", message=".*select_dtypes.*")
            self.client.log_table(run_id, data=columns, artifact_file=artifact_file)
        if csv_file is not None:
            self.log_text(run_id, _csv_text(columns), csv_file)

    def log_figure(self, run_id: str, figure: Any, artifact_file: str) -> None:
        """Log a matplotlib figure as an image (``.png``)."""
        self.client.log_figure(run_id, figure, artifact_file)

    def log_image(self, run_id: str, image: np.ndarray, artifact_file: str) -> None:
        """Log a 2D array (grey, any range: scaled to 0-255) or an RGB(A) uint8 image as PNG."""
        image = np.asarray(image)
        if image.ndim == 2 and image.dtype != np.uint8:
            lo, hi = float(np.nanmin(image)), float(np.nanmax(image))
            scaled = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image, dtype=float)
            image = np.clip(np.round(scaled * 255), 0, 255).astype(np.uint8)
        self.client.log_image(run_id, image, artifact_file)

    def log_montage(self, run_id: str, images: Mapping[str, Any], artifact_file: str = "montage.png") -> None:
        """Render named volumes side by side with :func:`medgen.io.montage.montage_grid`
        and log the PNG (e.g. degraded / output / reference / difference / uncertainty)."""
        from medgen.io.montage import montage_grid

        with tempfile.TemporaryDirectory(prefix="medgen-montage-") as tmp:
            png = Path(tmp) / Path(artifact_file).name
            montage_grid(dict(images), png)
            parent = str(Path(artifact_file).parent)
            self.log_artifact(run_id, png, None if parent in ("", ".") else parent)

    def log_model_checkpoint(
        self,
        run_id: str,
        checkpoint: str | Path,
        metadata: Mapping[str, Any],
        registered_name: str | None = None,
    ) -> str:
        """Log a model file as ``model/model.pt`` with ``model/medgen_model.json`` beside it.

        ``metadata`` (config JSON, normalisation, kind, ...) is what rebuilds the network.
        With ``registered_name`` a version of that registered model is created too.

        Returns
        -------
        str
            ``runs:/<run_id>/model``, or ``models:/<name>/<version>`` when registered.
        """
        check_no_phi(metadata, "model metadata")
        with tempfile.TemporaryDirectory(prefix="medgen-model-") as tmp:
            folder = Path(tmp) / MODEL_ARTIFACT_DIR
            folder.mkdir()
            shutil.copyfile(checkpoint, folder / MODEL_FILE)
            (folder / MODEL_META_FILE).write_text(json.dumps(dict(metadata), indent=2, sort_keys=True))
            self.client.log_artifacts(run_id, str(folder), MODEL_ARTIFACT_DIR)
        uri = f"runs:/{run_id}/{MODEL_ARTIFACT_DIR}"
        if registered_name is None:
            return uri
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(registered_name)
        except MlflowException as exc:
            if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
                raise
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT_DIR}"
        version = self.client.create_model_version(registered_name, source=source, run_id=run_id)
        return f"models:/{registered_name}/{version.version}"

    # -- reading back ----------------------------------------------------------------
    def find_run(self, run_id: str):
        """The run ``run_id``, or None when this store has no such run (deleted, another store)."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id)
        except MlflowException:
            return None

    def get_run(self, run_id: str):
        return self.client.get_run(run_id)

    def child_runs(self, parent_id: str) -> list:
        """Runs nested under ``parent_id`` (oldest first)."""
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
        )
        return sorted(runs, key=lambda r: r.info.start_time)


class RunHandle:
    """A run id bound to its tracker: ``handle.log_params(...)`` etc. without repeating the id."""

    def __init__(self, tracker: Tracker, run_id: str) -> None:
        self.tracker = tracker
        self.run_id = run_id

    def __getattr__(self, name: str):
        method = getattr(self.tracker, name)
        if name in {
            "set_tags",
            "log_params",
            "log_metrics",
            "log_artifact",
            "log_text",
            "log_dict",
            "log_image",
            "log_table",
            "log_figure",
            "log_montage",
            "log_model_checkpoint",
            "end_run",
            "get_run",
        }:
            return lambda *args, **kwargs: method(self.run_id, *args, **kwargs)
        raise AttributeError(name)

    def child(self, name: str, tags: Mapping[str, Any] | None = None):
        """A nested run under this one (a context manager, see :meth:`Tracker.run`)."""
        return self.tracker.run(name, parent_id=self.run_id, tags=tags)

    def __repr__(self) -> str:
        return f"RunHandle(run_id={self.run_id!r}, experiment={self.tracker.experiment!r})"


def is_model_uri(text: str | Path) -> bool:
    """True for ``runs:/...`` and ``models:/...`` URIs (MLflow), False for local paths."""
    return str(text).startswith(("runs:/", "models:/"))


def resolve_model_uri(
    model: str | Path, dst_dir: str | Path | None = None, tracking_uri: str | None = None
) -> Path:
    """A local model file for a path or an MLflow model URI.

    Parameters
    ----------
    model : str or Path
        A ``.pt`` file; a folder holding ``model.pt``; ``runs:/<run_id>/model``;
        ``models:/<name>/<version>``; or a ``file://`` URI.
    dst_dir : path, optional
        Where downloaded artifacts go (default: a new folder inside one temporary folder
        per process, removed when the process exits: load the model before then).
    tracking_uri : str, optional
        Default :func:`default_tracking_uri`; also used as the registry URI.

    Returns
    -------
    Path
        The model file (``model.pt``).

    Raises
    ------
    medgen.errors.InputError
        If nothing usable is found, one line naming ``model``.
    """
    from medgen.errors import InputError

    text = str(model)
    if text.startswith("file://"):
        text = unquote(urlparse(text).path)
    if is_model_uri(text):
        _mlflow()
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = tracking_uri or default_tracking_uri()
        dst = Path(dst_dir) if dst_dir is not None else _download_folder()
        dst.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        try:
            local = Path(_download(client, text, dst))
        except MlflowException as exc:
            first = exc.message.strip().splitlines()[0] if exc.message.strip() else type(exc).__name__
            raise InputError(text, f"cannot fetch the model from MLflow at {uri} ({first})") from None
        except OSError as exc:
            raise InputError(text, f"cannot fetch the model from MLflow at {uri} ({exc})") from None
        return _model_file_in(local, text)
    path = Path(text).expanduser()
    if not path.exists():
        raise InputError(
            path, "no such model file, folder or MLflow URI (runs:/<id>/model, models:/<name>/<version>)"
        )
    return _model_file_in(path, text)


def _download_folder() -> Path:
    """A new folder for one download, inside this process's temporary folder of models.

    That folder is removed at exit, so each ``medgen enhance --model models:/...`` no longer
    leaves a copy of the model behind; a forked child that exits normally leaves its parent's
    folder alone (the process id is checked).
    """
    pid = os.getpid()
    if pid not in _DOWNLOADS:
        _DOWNLOADS[pid] = Path(tempfile.mkdtemp(prefix="medgen-models-"))
        atexit.register(_remove_downloads, pid)
    return Path(tempfile.mkdtemp(dir=_DOWNLOADS[pid]))


def _remove_downloads(pid: int) -> None:
    if os.getpid() == pid and pid in _DOWNLOADS:
        shutil.rmtree(_DOWNLOADS.pop(pid), ignore_errors=True)


def _download(client, uri: str, dst: Path) -> str:
    """Fetch ``runs:/<id>/<path>`` or ``models:/<name>/<version|latest>`` (or ``@alias``)
    through ``client``, never through MLflow's process-global tracking/registry URIs."""
    from medgen.errors import InputError

    if uri.startswith("runs:/"):
        run_id, _, artifact_path = uri[len("runs:/") :].partition("/")
        if not run_id:
            raise InputError(uri, "expected runs:/<run_id>/<artifact path>")
        return client.download_artifacts(run_id, artifact_path or MODEL_ARTIFACT_DIR, str(dst))
    spec = uri[len("models:/") :].strip("/")
    if "@" in spec:
        name, alias = spec.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    else:
        name, _, number = spec.partition("/")
        if not name or not number:
            raise InputError(uri, "expected models:/<name>/<version> or models:/<name>@<alias>")
        if number == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise InputError(uri, f"registered model '{name}' has no versions")
            version = max(versions, key=lambda v: int(v.version))
        else:
            version = client.get_model_version(name, number)
    if version.run_id:
        run_uri = client.get_run(version.run_id).info.artifact_uri.rstrip("/")
        source = str(version.source).rstrip("/")
        if source.startswith(run_uri + "/"):
            return client.download_artifacts(version.run_id, source[len(run_uri) + 1 :], str(dst))
    from mlflow.artifacts import download_artifacts

    return download_artifacts(
        artifact_uri=version.source, dst_path=str(dst), tracking_uri=client.tracking_uri
    )


def _model_file_in(path: Path, source: str) -> Path:
    from medgen.errors import InputError

    if path.is_file():
        return path
    candidates = [path / MODEL_FILE, path / MODEL_ARTIFACT_DIR / MODEL_FILE]
    for c in candidates:
        if c.is_file():
            return c
    found = sorted(path.rglob("*.pt"))
    if len(found) == 1:
        return found[0]
    raise InputError(source, f"no {MODEL_FILE} found in the model artifacts")
