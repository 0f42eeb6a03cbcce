"""Local MONAI model-zoo latent diffusion bundles, read as data and run offline.

A bundle folder holds ``configs/inference.json`` (+ ``metadata.json``) and ``models/*.pt``,
as MONAI's ``brain_image_synthesis_latent_diffusion_model`` does. MONAI runs such a bundle by
evaluating its ``"$..."`` Python strings and importing whatever its ``_target_`` names; medgen
does neither (configs hold values, never code). Instead:

* the JSON is parsed and plain ``"@key"`` / ``"@key#sub"`` references are followed; a ``"$"``
  expression is kept as text and only ever matched against a few fixed patterns (the noise
  shape, ``num_inference_steps=``, the covariates' ``@names``, a weights file name);
* only ``AutoencoderKL`` and ``DiffusionModelUNet`` from ``monai.networks.nets`` are built (the
  ``generative.networks.nets`` originals map onto them, legacy argument names are renamed),
  and DDPM/DDIM schedulers are read for their values, never instantiated from the config;
* weights load with ``torch.load(weights_only=True)``; weights saved by the old
  ``generative`` package go through MONAI's ``load_old_state_dict``.

:func:`read_bundle` returns the networks and plain facts;
:func:`medgen.inference.loading.load_bundle` wraps them as a
:class:`medgen.inference.loading.SynthesisModel`.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medgen.errors import InputError

CONFIGS = "configs"
WEIGHTS = "models"
NETWORK_PREFIXES = ("monai.networks.nets.", "generative.networks.nets.")
SCHEDULER_PREFIXES = ("monai.networks.schedulers.", "generative.networks.schedulers.")
NETWORKS = ("AutoencoderKL", "DiffusionModelUNet")
SCHEDULERS = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm"}
#: ``generative`` argument names -> MONAI >= 1.4 names.
LEGACY_ARGUMENTS = {"num_channels": "channels", "use_checkpointing": "use_checkpoint"}
#: ``generative`` / diffusers ``beta_schedule`` values -> MONAI ``schedule`` names.
LEGACY_SCHEDULES = {"scaled_linear": "scaled_linear_beta", "linear": "linear_beta", "sigmoid": "sigmoid_beta"}
#: Where the networks' definitions live, in order of preference.
DEFINITION_KEYS = {"AutoencoderKL": ("autoencoder_def", "autoencoder"),
                   "DiffusionModelUNet": ("diffusion_def", "network_def", "diffusion")}  # fmt: skip
#: Weights files tried after the one the config names (relative to ``models/``).
WEIGHT_NAMES = {"AutoencoderKL": ("autoencoder.pt", "autoencoder.pth", "model_autoencoder.pt"),
                "DiffusionModelUNet": ("diffusion_model.pt", "diffusion_model.pth", "model.pt", "model.pth",
                                       "diffusion.pt")}  # fmt: skip
WEIGHT_PATH_KEYS = {"AutoencoderKL": "load_autoencoder_path", "DiffusionModelUNet": "load_diffusion_path"}
DEFAULT_STEPS = 50
#: Scheduler values passed on to the noise schedule.
SCHEDULE_ARGS = ("beta_start", "beta_end", "sig_range")

_REFERENCE = re.compile(r"^@([A-Za-z_]\w*(?:(?:#|::)\w+)*)$")
_RANDN_SHAPE = re.compile(r"randn\(\s*[(\[]\s*(\d+(?:\s*,\s*\d+)*)\s*,?\s*[)\]]")
_STEPS = re.compile(r"num_inference_steps\s*=\s*(\d+)")
_QUOTED_WEIGHTS = re.compile(r"""['"]([^'"]*\.pth?)['"]""")
_SPACING = re.compile(r"(\d+(?:\.\d+)?)\s*x\s*(\d+(?:\.\d+)?)\s*x\s*(\d+(?:\.\d+)?)\s*mm")


class Expression(str):
    """A ``"$..."`` expression or ``"%..."`` macro of a bundle config: text, never evaluated."""


class _Problem(Exception):
    """A config value medgen cannot use; :func:`read_bundle` turns it into an InputError."""


@dataclass
class BundleContents:
    """What a bundle holds, as networks and plain values (no inference-layer types).

    ``latent_shape`` is ``(C, d, h, w)``; ``shape_vox`` the decoded grid ``(D, H, W)``;
    ``scheduler`` the DDPM/DDIM values (``schedule``, ``beta_start``, ...); ``covariates``
    the names of the context entries in order, ``covariate_defaults`` the bundle's own values.
    """

    folder: Path
    autoencoder: nn.Module
    denoiser: BundleDenoiser
    scale_factor: float
    latent_shape: list[int]
    shape_vox: list[int]
    spacing_mm: list[float]
    sampler: str
    steps: int
    scheduler: dict[str, Any]
    covariates: list[str] = field(default_factory=list)
    covariate_defaults: dict[str, float] = field(default_factory=dict)
    value_range: tuple[float, float] = (0.0, 1.0)
    modality: str = "MR"
    metadata: dict[str, Any] = field(default_factory=dict)


class BundleDenoiser(nn.Module):
    """A bundle's ``DiffusionModelUNet`` behind :class:`~medgen.models.latent_diffusion.LatentDenoiser`'s call.

    Covariates ``(B, n)`` (scaled to [0, 1]) reach the UNet as cross-attention context
    ``(B, 1, n)`` and, when its ``in_channels`` exceed ``out_channels`` by ``n`` (the brain
    bundle's layout), also as ``n`` constant channels appended to ``x_t``.

    Shapes
    ------
    ``forward(x_t, timesteps, class_labels=None, covariates=None)``: ``x_t`` ``(B, C, d, h, w)``,
    ``timesteps`` ``(B,)``; returns ``(B, C, d, h, w)``. ``class_labels`` is ignored.
    """

    def __init__(self, net: nn.Module, num_covariates: int, cross_attention: bool, concat_covariates: bool) -> None:
        super().__init__()
        self.net = net
        self.num_classes = 0
        self.num_covariates = int(num_covariates)
        self.cross_attention = bool(cross_attention)
        self.concat_covariates = bool(concat_covariates)

    def forward(self, x_t, timesteps, class_labels=None, covariates=None) -> torch.Tensor:
        context = None
        if self.num_covariates:
            if covariates is None:
                raise ValueError(f"this model needs {self.num_covariates} covariate(s); none were given")
            values = covariates.to(x_t.dtype).reshape(x_t.shape[0], self.num_covariates)
            if self.cross_attention:
                context = values[:, None, :]
            if self.concat_covariates:
                planes = values[:, :, None, None, None].expand(-1, -1, *x_t.shape[2:])
                x_t = torch.cat([x_t, planes], dim=1)
        return self.net(x_t, timesteps=timesteps, context=context)


# --------------------------------------------------------------------------- config reading


def _lookup(config: dict[str, Any], ident: str) -> Any:
    node: Any = config
    for part in re.split(r"#|::", ident):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise _Problem(f"'@{ident}' refers to nothing in the config")
    return node


def resolve(value: Any, config: dict[str, Any], _seen: tuple[str, ...] = ()) -> Any:
    """``value`` with plain ``@key`` references replaced by what they name (recursively);
    ``$``/``%`` strings come back as :class:`Expression`, unevaluated.

    Examples
    --------
    >>> resolve(["@c", 8, "$1 + 1"], {"c": "@d", "d": 3})
    [3, 8, '$1 + 1']
    """
    if isinstance(value, str):
        if value.startswith(("$", "%")):
            return Expression(value)
        match = _REFERENCE.match(value)
        if not match:
            return value
        ident = match.group(1)
        if ident in _seen:
            raise _Problem(f"'@{ident}' refers to itself")
        return resolve(_lookup(config, ident), config, (*_seen, ident))
    if isinstance(value, dict):
        return {k: resolve(v, config, _seen) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, config, _seen) for v in value]
    return value


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot be read ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(path, "a bundle config must be a JSON object")
    return data


def read_configs(folder: Path) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The inference config (``configs/inference.json``, else every other JSON config merged
    in name order), ``metadata.json`` (or ``{}``) and a name for messages."""
    configs = folder / CONFIGS
    files = sorted(p for p in configs.glob("*.json") if p.name != "metadata.json") if configs.is_dir() else []
    if not files:
        raise InputError(folder, f"not a usable bundle: no JSON config in {CONFIGS}/ (expected {CONFIGS}/inference.json)")
    inference = configs / "inference.json"
    chosen = [inference] if inference in files else files
    config: dict[str, Any] = {}
    for path in chosen:
        config.update(_read_json(path))
    metadata = _read_json(configs / "metadata.json") if (configs / "metadata.json").is_file() else {}
    name = f"{CONFIGS}/{chosen[0].name}" if len(chosen) == 1 else f"{CONFIGS}/*.json"
    return config, metadata, name


def _class_name(target: Any, prefixes: tuple[str, ...], allowed) -> str | None:
    """``"generative.networks.nets.AutoencoderKL"`` -> ``"AutoencoderKL"``; None if not allowed."""
    if not isinstance(target, str):
        return None
    for prefix in prefixes:
        if target.startswith(prefix) and target[len(prefix) :] in allowed:
            return target[len(prefix) :]
    return None


def find_definition(config: dict[str, Any], kind: str) -> tuple[str, dict[str, Any]]:
    """The key and resolved definition of the ``kind`` network (``AutoencoderKL`` or
    ``DiffusionModelUNet``): the first of :data:`DEFINITION_KEYS` that builds one, else any
    top-level definition whose ``_target_`` names one.

    Raises ``_Problem`` for a definition key whose ``_target_`` medgen will not build.
    """
    keys = [k for k in DEFINITION_KEYS[kind] if k in config]
    keys += [k for k in config if k not in keys and isinstance(config[k], dict) and "_target_" in config[k]]
    for key in keys:
        try:
            definition = resolve(config[key], config)
        except _Problem:
            if key in DEFINITION_KEYS[kind]:
                raise
            continue
        if not isinstance(definition, dict) or "_target_" not in definition:
            continue
        target = definition["_target_"]
        name = _class_name(target, NETWORK_PREFIXES, NETWORKS)
        if name == kind:
            return key, definition
        if name is None and key in DEFINITION_KEYS[kind] and not _class_name(target, SCHEDULER_PREFIXES, SCHEDULERS):
            raise _Problem(
                f"'{key}' has unsupported _target_ {target!r}: medgen builds only AutoencoderKL and "
                "DiffusionModelUNet from monai.networks.nets (or generative.networks.nets)"
            )
    raise _Problem(f"defines no {kind} network (expected '{DEFINITION_KEYS[kind][0]}' with a _target_ naming it)")


def network_arguments(key: str, definition: dict[str, Any], cls: type) -> dict[str, Any]:
    """Constructor arguments of ``cls`` from a definition: ``_``-keys dropped, legacy names
    renamed, values checked to be plain data and accepted by ``cls``."""
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kwargs: dict[str, Any] = {}
    for name, value in definition.items():
        if name.startswith("_"):
            continue
        new = LEGACY_ARGUMENTS.get(name, name)
        if new not in accepted:
            raise _Problem(f"'{key}.{name}' is not an argument of MONAI's {cls.__name__}")
        if _has_expression(value):
            raise _Problem(f"'{key}.{name}' is a Python expression ({value!r}), which medgen does not evaluate: write the value")
        kwargs[new] = value
    return kwargs


def _has_expression(value: Any) -> bool:
    if isinstance(value, Expression):
        return True
    if isinstance(value, dict):
        return any(_has_expression(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_expression(v) for v in value)
    return False


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _ints(values: Any) -> list[int] | None:
    if isinstance(values, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return [int(v) for v in values]
    return None


def scheduler_settings(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``("ddim" | "ddpm", values)`` of the bundle's scheduler definition (never instantiated)."""
    for key in ("scheduler", "noise_scheduler", *config):
        definition = config.get(key)
        if not (isinstance(definition, dict) and isinstance(definition.get("_target_"), str)):
            continue
        target = definition["_target_"]
        name = _class_name(target, SCHEDULER_PREFIXES, SCHEDULERS)
        if name is None:
            if key in ("scheduler", "noise_scheduler"):
                raise _Problem(f"'{key}' has unsupported _target_ {target!r}: medgen reads only DDPMScheduler and DDIMScheduler")
            continue
        values = resolve({k: v for k, v in definition.items() if not k.startswith("_")}, config)
        if "beta_schedule" in values and "schedule" not in values:
            legacy = values.pop("beta_schedule")
            if legacy not in LEGACY_SCHEDULES:
                raise _Problem(f"'{key}.beta_schedule' {legacy!r} is not one of {', '.join(LEGACY_SCHEDULES)}")
            values["schedule"] = LEGACY_SCHEDULES[legacy]
        return SCHEDULERS[name], values
    raise _Problem("defines no DDPMScheduler/DDIMScheduler ('scheduler' with a _target_ naming one)")


def _check_scheduler(sampler: str, values: dict[str, Any], steps: int) -> None:
    """Build the MONAI scheduler once from the plain values, so bad ones fail at load time."""
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

    cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
    args = {k: values[k] for k in ("num_train_timesteps", "schedule", "prediction_type", *SCHEDULE_ARGS) if k in values}
    try:
        cls(**args).set_timesteps(steps)
    except (TypeError, ValueError, KeyError) as exc:
        raise _Problem(f"scheduler values cannot be used ({str(exc).strip().splitlines()[0]})") from None


def _steps(config: dict[str, Any], default: int) -> int:
    value = config.get("num_inference_steps")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    for value in config.values():
        match = _STEPS.search(value) if isinstance(value, str) else None
        if match:
            return int(match.group(1))
    return default


def _latent_shape(config: dict[str, Any], metadata: dict[str, Any], latent_channels: int, factor: int) -> list[int]:
    shape = _ints(resolve(config["latent_shape"], config)) if "latent_shape" in config else None
    if shape is None and isinstance(config.get("noise"), str):
        match = _RANDN_SHAPE.search(config["noise"])  # e.g. "$torch.randn((1, 3, 20, 28, 20))..."
        shape = [int(v) for v in match.group(1).split(",")] if match else None
        shape = shape[1:] if shape and len(shape) == 5 else shape
    if shape is None:
        spatial = _ints(_output_format(metadata).get("spatial_shape"))
        if spatial and all(s % factor == 0 for s in spatial):
            shape = [latent_channels, *(s // factor for s in spatial)]
    if shape is not None and len(shape) == 3:
        shape = [latent_channels, *shape]
    if shape is None or len(shape) != 4:
        raise _Problem("gives no latent shape ('latent_shape', a 'noise' torch.randn shape, or metadata spatial_shape)")
    if shape[0] != latent_channels:
        raise _Problem(f"latent shape {shape} does not fit the autoencoder's {latent_channels} latent channels")
    return shape


def _output_format(metadata: dict[str, Any]) -> dict[str, Any]:
    outputs = (metadata.get("network_data_format") or {}).get("outputs") or {}
    first = outputs.get("pred") or next(iter(outputs.values()), {})
    return first if isinstance(first, dict) else {}


def _value_range(output_format: dict[str, Any]) -> tuple[float, float]:
    """The network output's ``value_range`` (metadata), else (0, 1)."""
    values = output_format.get("value_range")
    if isinstance(values, list) and len(values) == 2 and all(_number(v) is not None for v in values):
        if float(values[1]) > float(values[0]):
            return float(values[0]), float(values[1])
    return 0.0, 1.0


def _spacing_mm(config: dict[str, Any], metadata: dict[str, Any]) -> list[float]:
    for key in ("spacing_mm", "spacing", "pixdim"):
        value = resolve(config[key], config) if key in config else None
        if isinstance(value, list) and len(value) == 3 and all(_number(v) and _number(v) > 0 for v in value):
            return [float(v) for v in value]
    match = _SPACING.search(str(metadata.get("image_classes", "")))
    return [float(v) for v in match.groups()] if match else [1.0, 1.0, 1.0]


def _covariate_names(config: dict[str, Any], metadata: dict[str, Any], n: int) -> tuple[list[str], dict[str, float]]:
    """Names of the ``n`` context entries: the numeric ``@refs`` of the config's
    ``conditioning`` expression, else the metadata's tabular input channels, else numbered."""
    text = config.get("conditioning")
    if isinstance(text, str):
        refs = [r for r in re.findall(r"@([A-Za-z_]\w*)", text) if _number(config.get(r)) is not None]
        if len(refs) == n:
            return refs, {r: float(config[r]) for r in refs}
    inputs = (metadata.get("network_data_format") or {}).get("inputs") or {}
    for spec in inputs.values():
        channels = spec.get("channel_def") if isinstance(spec, dict) else None
        if isinstance(channels, dict) and len(channels) == n:
            names = [re.sub(r"\W+", "_", str(channels[k]).strip().lower()).strip("_") for k in sorted(channels, key=str)]
            if len(set(names)) == n and all(names):
                return names, {}
    return [f"covariate_{i}" for i in range(n)], {}


# --------------------------------------------------------------------------- weights


def _weights_file(folder: Path, config: dict[str, Any], kind: str) -> Path | None:
    names = []
    text = config.get(WEIGHT_PATH_KEYS[kind])
    match = _QUOTED_WEIGHTS.search(text) if isinstance(text, str) else None
    if match:  # "$@model_dir + '/autoencoder.pt'" or "$@bundle_root + '/models/x.pt'"
        name = match.group(1).lstrip("/")
        names.append(name[len(WEIGHTS) + 1 :] if name.startswith(f"{WEIGHTS}/") else name)
    names += WEIGHT_NAMES[kind]
    root = (folder / WEIGHTS).resolve()
    for name in names:
        path = (root / name).resolve()
        if path.is_relative_to(root) and path.is_file():
            return path
    return None


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(path, f"not loadable weights ({first})") from None
    if isinstance(payload, dict) and not all(isinstance(v, torch.Tensor) for v in payload.values()):
        inner = [payload[k] for k in ("state_dict", "model", "network") if isinstance(payload.get(k), dict)]
        payload = inner[0] if inner else payload
    if not isinstance(payload, dict) or not payload or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise InputError(path, "holds no state dict (a mapping of parameter names to tensors)")
    if all(k.startswith("module.") for k in payload):  # saved from DistributedDataParallel
        payload = {k[len("module.") :]: v for k, v in payload.items()}
    return dict(payload)


def load_weights(net: nn.Module, path: Path, key: str, config_name: str) -> None:
    """Load ``path`` into ``net``: plainly, else as weights of the old ``generative`` package
    (MONAI's ``load_old_state_dict``), accepted only if every stored tensor was used."""
    state = _state_dict(path)
    try:
        net.load_state_dict(state)
        return
    except RuntimeError as exc:
        detail = _mismatch(str(exc))
    unused = dict(state)
    expected = len(net.state_dict())
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints progress
            net.load_old_state_dict(unused)
        filled = sum(1 for k in net.state_dict() if ".attn.out_proj." in k)  # it may make these itself
        legacy_ok = not unused and len(state) >= expected - filled
    except (RuntimeError, KeyError, ValueError):
        legacy_ok = False
    if not legacy_ok:
        raise InputError(path, f"weights do not match '{key}' in {config_name} ({detail})")


def _mismatch(text: str) -> str:
    """``load_state_dict``'s long complaint, in a few words."""
    parts = []
    for label, pattern in (("missing", r"Missing key\(s\) in state_dict: (.*)"),
                           ("unexpected", r"Unexpected key\(s\) in state_dict: (.*)")):  # fmt: skip
        match = re.search(pattern, text)
        keys = re.findall(r'"([^"]+)"', match.group(1)) if match else []
        if keys:
            parts.append(f"{len(keys)} {label} tensor(s), e.g. {keys[0]}")
    shapes = re.findall(r"size mismatch for ([\w.]+)", text)
    if shapes:
        parts.append(f"{len(shapes)} tensor(s) of another shape, e.g. {shapes[0]}")
    return "; ".join(parts) or (text.strip().splitlines() or ["unknown difference"])[0][:160]


# --------------------------------------------------------------------------- assembly


def _int_arg(key: str, args: dict[str, Any], name: str, default: int | None = None) -> int:
    value = args.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Problem(f"'{key}.{name}' must be an integer, got {value!r}")
    return value


@dataclass
class _Plan:
    """The two networks' checked constructor arguments, and how covariates reach the UNet."""

    ae_key: str
    ae_args: dict[str, Any]
    dm_key: str
    dm_args: dict[str, Any]
    levels: int
    num_covariates: int
    cross_attention: bool
    concat: bool


def _plan(config: dict[str, Any]) -> _Plan:
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet  # lazy: MONAI is heavy to import

    ae_key, ae_def = find_definition(config, "AutoencoderKL")
    dm_key, dm_def = find_definition(config, "DiffusionModelUNet")
    ae_args = network_arguments(ae_key, ae_def, AutoencoderKL)
    dm_args = network_arguments(dm_key, dm_def, DiffusionModelUNet)
    for key, args in ((ae_key, ae_args), (dm_key, dm_args)):
        if _int_arg(key, args, "spatial_dims") != 3:
            raise _Problem(f"'{key}.spatial_dims' is {args['spatial_dims']}: medgen synthesizes 3D volumes only")
    if _int_arg(ae_key, ae_args, "out_channels", 1) != 1:
        raise _Problem(f"'{ae_key}.out_channels' must be 1 (one-channel volumes), got {ae_args['out_channels']}")
    if dm_args.get("num_class_embeds"):
        raise _Problem(f"'{dm_key}' uses class embeddings, which medgen does not take from bundles")
    latent = _int_arg(ae_key, ae_args, "latent_channels", 3)
    if _int_arg(dm_key, dm_args, "out_channels") != latent:
        raise _Problem(f"'{dm_key}.out_channels' ({dm_args['out_channels']}) differs from the "
                       f"autoencoder's latent_channels ({latent})")  # fmt: skip
    channels = _ints(ae_args.get("channels", [32, 64, 64, 64]))
    if not channels:
        raise _Problem(f"'{ae_key}.channels' must be a list of integers, got {ae_args.get('channels')!r}")
    extra = _int_arg(dm_key, dm_args, "in_channels") - latent
    cross = bool(dm_args.get("with_conditioning")) and dm_args.get("cross_attention_dim") is not None
    n_context = _int_arg(dm_key, dm_args, "cross_attention_dim") if cross else 0
    if extra < 0 or (extra and cross and extra != n_context):
        raise _Problem(f"'{dm_key}.in_channels' ({dm_args['in_channels']}) is neither the latent channels "
                       f"({latent}) nor those plus the {n_context} conditioning value(s)")  # fmt: skip
    return _Plan(ae_key, ae_args, dm_key, dm_args, len(channels), max(extra, n_context), cross, extra > 0)


def _build(plan: _Plan) -> tuple[nn.Module, BundleDenoiser]:
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

    built = []
    for cls, key, kwargs in ((AutoencoderKL, plan.ae_key, plan.ae_args), (DiffusionModelUNet, plan.dm_key, plan.dm_args)):
        try:
            built.append(cls(**kwargs))
        except (TypeError, ValueError, AssertionError) as exc:
            raise _Problem(f"'{key}' does not build a {cls.__name__} ({str(exc).strip().splitlines()[0]})") from None
    return built[0], BundleDenoiser(built[1], plan.num_covariates, plan.cross_attention, plan.concat)


def read_bundle(path: str | Path, *, device: str | torch.device = "cpu") -> BundleContents:
    """Networks (weights loaded, eval mode, on ``device``) and facts of the bundle at ``path``.

    Raises
    ------
    InputError
        One line naming the folder (or file): no JSON config, no network definitions, an
        unsupported ``_target_``, a ``$`` expression where a value is needed, no weights in
        ``models/``, weights that do not match the config.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(folder, "bundle folder not found")
    config, metadata, config_name = read_configs(folder)
    try:
        plan = _plan(config)
        sampler, scheduler = scheduler_settings(config)
        factor = 2 ** (plan.levels - 1)
        latent_shape = _latent_shape(config, metadata, plan.ae_args.get("latent_channels", 3), factor)
        scale = _number(resolve(config.get("scale_factor", 1.0), config))
        steps = _steps(config, DEFAULT_STEPS)
        _check_scheduler(sampler, scheduler, steps)
        if scale is None or scale <= 0:
            raise _Problem(f"'scale_factor' must be a number > 0, got {config.get('scale_factor')!r}")
        files = {kind: _weights_file(folder, config, kind) for kind in NETWORKS}
        if not any(files.values()):
            hint = " (download the files listed in large_files.yml)" if (folder / "large_files.yml").is_file() else ""
            raise InputError(folder, f"bundle has no weights: no {WEIGHTS}/*.pt or *.pth files for its networks{hint}")
        for kind, key in (("AutoencoderKL", plan.ae_key), ("DiffusionModelUNet", plan.dm_key)):
            if files[kind] is None:
                tried = ", ".join(WEIGHT_NAMES[kind][:2])
                reason = f"bundle has no weights for '{key}' in {WEIGHTS}/ (tried the config's file, {tried}, ...)"
                raise InputError(folder, reason)
        autoencoder, denoiser = _build(plan)
    except _Problem as problem:
        raise InputError(folder, f"{config_name} {problem}") from None
    load_weights(autoencoder, files["AutoencoderKL"], plan.ae_key, config_name)
    load_weights(denoiser.net, files["DiffusionModelUNet"], plan.dm_key, config_name)
    dev = torch.device(device)
    names, defaults = _covariate_names(config, metadata, denoiser.num_covariates)
    out = _output_format(metadata)
    modality = out.get("modality") if isinstance(out.get("modality"), str) else "MR"
    return BundleContents(
        folder=folder,
        autoencoder=autoencoder.to(dev).eval(),
        denoiser=denoiser.to(dev).eval(),
        scale_factor=float(scale),
        latent_shape=latent_shape,
        shape_vox=[s * factor for s in latent_shape[1:]],
        spacing_mm=_spacing_mm(config, metadata),
        sampler=sampler,
        steps=steps,
        scheduler=scheduler,
        covariates=names,
        covariate_defaults=defaults,
        value_range=_value_range(out),
        modality="MR" if modality.upper() in ("MR", "MRI") else modality,
        metadata={k: metadata[k] for k in ("version", "task", "description", "authors", "intended_use") if k in metadata},
    )
