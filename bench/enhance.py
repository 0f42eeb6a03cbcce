"""Speed of medgen's enhancement models: inference, training steps, end to end, classical tools.

One run prints one table. Every model is built from its config in ``configs/`` with random
weights (speed does not depend on training), and measured through medgen's own code paths:

* inference   sliding-window prediction over the whole normalised volume
              (:func:`medgen.inference.enhance.predict_array`; diffusion:
              :func:`~medgen.inference.enhance.sample_diffusion_array`, DDIM);
* train step  one :meth:`medgen.training.trainer.Trainer.train_step` (objective, backward,
              gradient clipping, AdamW, LR schedule, EMA; the GAN's critic update included)
              on a fixed batch, so patch sampling is not counted;
* end to end  ``read_nifti`` -> :func:`~medgen.inference.enhance.enhance_with` -> ``write_nifti``
              (.nii.gz) of a noisy CT head phantom, timed as one;
* classical   Gaussian smoothing, non-local means, cubic B-spline (and iterative
              back-projection) on the same volume.

Each row is fp32 eager against the variants: bf16 autocast (medgen's ``amp`` on CUDA; on the
CPU through a bench-only wrapper, since medgen's AMP is CUDA-only), channels-last
(``torch.channels_last_3d``) and ``torch.compile``. Times are medians of ``--repeats`` runs
after ``--warmup`` runs (``torch.cuda.synchronize()`` around each run on the GPU).

    python bench/enhance.py                                # CPU: 128x128x64 CT, a few minutes
    python bench/enhance.py --compile on --models unet      # + torch.compile rows (slow to compile)
    python bench/enhance.py --device cuda                   # GPU: 512x512x300, all rows

On a GPU with a time limit per command, split the run (each prints its own table):

    python bench/enhance.py --device cuda --sections e2e,classical --models unet
    python bench/enhance.py --device cuda --sections train
    python bench/enhance.py --device cuda --sections inference --models unet,gan
    python bench/enhance.py --device cuda --sections e2e,inference --models diffusion --repeats 1

Targets on an H200 for a 512x512x300 CT: supervised model end to end < 5 s, diffusion with
<= 20 DDIM steps < 60 s, bf16 AMP >= 1.8x faster than fp32 per training step.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
CACHE = REPO / "bench" / ".cache"
MODEL_CONFIGS = {"unet": "denoise-ct.yaml", "gan": "gan-mr.yaml", "diffusion": "diffusion-mr.yaml"}
SECTIONS = ("inference", "train", "e2e", "classical")
FIELD_OF_VIEW_MM = (230.0, 230.0, 190.0)  # head CT: the phantom fills any grid
NOISE_FRACTION = 0.03  # Gaussian noise, 3% of the robust HU span (the CT setting)
TARGET_E2E_UNET_S = 5.0
TARGET_E2E_DIFFUSION_S = 60.0
TARGET_AMP_SPEEDUP = 1.8


# -- command line --------------------------------------------------------------------------
def shape_arg(text: str) -> tuple[int, int, int]:
    """``"96x96x48"`` -> ``(96, 96, 48)``."""
    parts = text.lower().split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 8:
        raise argparse.ArgumentTypeError(f"must be three integers >= 8 like 96x96x48, got {text!r}")
    return shape  # type: ignore[return-value]


def list_arg(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        import difflib

        items = [t.strip() for t in text.split(",") if t.strip()]
        for item in items:
            if item not in choices:
                close = difflib.get_close_matches(item, choices, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise argparse.ArgumentTypeError(f"must be among {', '.join(choices)}; got {item!r}{hint}")
        return items

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--volume", type=shape_arg, help="CT phantom grid (default 128x128x64 on CPU, 512x512x300 on CUDA)")
    p.add_argument("--diffusion-volume", type=shape_arg,
                   help="grid for diffusion inference/e2e: a central crop (default 64x64x32 on CPU, --volume on CUDA)")
    p.add_argument("--diffusion-steps", type=int, help="DDIM steps, <= 20 (default 2 on CPU, the config's on CUDA)")
    p.add_argument("--diffusion-samples", type=int, help="samples per volume (default 1 on CPU, the config's on CUDA)")
    p.add_argument("--train-patch", type=shape_arg, help="training patch (default: each config's)")
    p.add_argument("--train-batch", type=int, help="training batch size (default: each config's)")
    p.add_argument("--models", type=list_arg(tuple(MODEL_CONFIGS)), default=list(MODEL_CONFIGS))
    p.add_argument("--sections", type=list_arg(SECTIONS), default=list(SECTIONS))
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile rows (auto: on for CUDA; on the CPU compiling takes minutes)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row; the median is shown")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (training: one more)")
    p.add_argument("--max-seconds-per-row", type=float, default=60.0,
                   help="stop repeating a row once its timed runs add up to this")
    p.add_argument("--threads", type=int, help="torch threads (default 2 on CPU, torch's default on CUDA)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = p.parse_args(argv)
    for name in ("repeats", "diffusion_samples", "train_batch", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"`--{name.replace('_', '-')}` must be >= 1, got {value}")
    if args.warmup < 0:
        p.error(f"`--warmup` must be >= 0, got {args.warmup}")
    if args.diffusion_steps is not None and not 1 <= args.diffusion_steps <= 20:
        p.error(f"`--diffusion-steps` must be in [1, 20], got {args.diffusion_steps}")
    return args


# -- timing --------------------------------------------------------------------------------
@dataclass
class Timing:
    median_s: float
    best_s: float
    runs: int
    first_s: float  # the first warm-up run (compilation, autotuning, allocation)
    parts: dict[str, float]  # medians of named sub-timings (end to end)


def measure(fn: Callable[[], dict[str, float] | None], sync: Callable[[], None], warmup: int,
            repeats: int, budget_s: float, warmup_fn: Callable[[], object] | None = None) -> Timing:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` untimed ones.

    ``warmup_fn`` (default ``fn``) is what the untimed runs call: a shorter run with the same
    shapes (one DDIM step instead of twenty) compiles and autotunes just as well.
    """
    first = float("nan")
    for i in range(warmup):
        sync()
        start = time.perf_counter()
        (warmup_fn or fn)()
        sync()
        if i == 0:
            first = time.perf_counter() - start
    times: list[float] = []
    parts: dict[str, list[float]] = {}
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        sub = fn()
        sync()
        times.append(time.perf_counter() - start)
        for key, value in (sub.items() if isinstance(sub, dict) else ()):
            parts.setdefault(key, []).append(value)
        if sum(times) >= budget_s:
            break
    return Timing(statistics.median(times), min(times), len(times), first,
                  {k: statistics.median(v) for k, v in parts.items()})


@dataclass
class Row:
    section: str
    model: str
    variant: str
    seconds: float | None  # median; None: skipped
    runs: int = 0
    best: float | None = None
    voxels: int | None = None
    reference: str | None = None  # "model/variant" of the row this one is compared with
    note: str = ""

    @classmethod
    def timed(cls, section: str, model: str, variant: str, t: Timing, voxels: int | None,
              reference: str | None, note: str = "") -> Row:
        return cls(section, model, variant, t.median_s, t.runs, t.best_s, voxels, reference, note)

    @property
    def key(self) -> str:
        return f"{self.section}:{self.model}/{self.variant}"


class Bench:
    """Options, the device and the rows measured so far."""

    def __init__(self, args: argparse.Namespace, device) -> None:
        import torch

        self.args = args
        self.device = device
        self.cuda = device.type == "cuda"
        self.rows: list[Row] = []
        self.sync = (lambda: torch.cuda.synchronize(device)) if self.cuda else (lambda: None)

    def time(self, fn, *, warmup: int | None = None, warmup_fn=None) -> Timing:
        w = self.args.warmup if warmup is None else warmup
        return measure(fn, self.sync, w, self.args.repeats, self.args.max_seconds_per_row, warmup_fn)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        shown = "skipped" if row.seconds is None else f"{row.seconds:.3f} s"
        print(f"  {row.section:<10} {row.model:<10} {row.variant:<28} {shown}", file=sys.stderr, flush=True)
        return row

    def seconds_of(self, key: str) -> float | None:
        return next((r.seconds for r in self.rows if r.key == key), None)


# -- variants ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One way of running a network."""

    name: str
    amp: bool = False  # medgen's own AMP switch (bf16 autocast, CUDA only)
    cpu_bf16: bool = False  # bf16 autocast on the CPU, through the bench wrapper
    channels_last: bool = False
    compile: bool = False


def variants(bench: Bench, with_channels_last: bool = True) -> list[Variant]:
    """fp32 first (the reference), then bf16, channels-last, both, and compiled.

    On the CPU only the U-Net gets the channels-last and compiled rows (the GAN generator is
    the same network; the diffusion network is slow enough that they would break the budget).
    """
    bf16 = Variant("bf16 AMP (medgen amp)", amp=True) if bench.cuda else Variant("bf16 autocast (CPU)", cpu_bf16=True)
    out = [Variant("fp32"), bf16]
    if with_channels_last:
        out += [Variant("channels-last", channels_last=True),
                replace(bf16, name="bf16 + channels-last", channels_last=True)]
    if bench.args.compile == "on" or (bench.args.compile == "auto" and bench.cuda):
        out.append(replace(bf16, name="torch.compile + bf16", compile=True) if bench.cuda
                   else Variant("torch.compile", compile=True))
    return out


def _wrapper_class():
    import torch
    from torch import nn

    class RunAs(nn.Module):
        """Calls ``inner`` with channels-last 3D inputs and/or under CPU bf16 autocast.

        A bench-only adapter: medgen's sliding window and trainer pass contiguous tensors and
        apply AMP on CUDA only. Diffusion attributes are copied so samplers still see them.
        """

        def __init__(self, inner: nn.Module, channels_last: bool, cpu_bf16: bool) -> None:
            super().__init__()
            self.inner = inner
            self.channels_last = channels_last
            self.cpu_bf16 = cpu_bf16
            for name in ("target", "prediction_type", "noise_conditioning"):
                if hasattr(inner, name):
                    setattr(self, name, getattr(inner, name))

        def forward(self, *args):
            if self.channels_last:
                args = tuple(a.contiguous(memory_format=torch.channels_last_3d)
                             if isinstance(a, torch.Tensor) and a.ndim == 5 else a for a in args)
            context = torch.autocast("cpu", dtype=torch.bfloat16) if self.cpu_bf16 else nullcontext()
            with context:
                out = self.inner(*args)
            return out.float() if self.cpu_bf16 else out

    return RunAs


def prepare(model, variant: Variant, device):
    """A copy of ``model`` set up as ``variant`` asks (the original is left alone)."""
    import torch

    net = copy.deepcopy(model).to(device)
    if variant.channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    if variant.channels_last or variant.cpu_bf16:
        net = _wrapper_class()(net, variant.channels_last, variant.cpu_bf16)
    if variant.compile:
        net = torch.compile(net)
    return net


# -- data ----------------------------------------------------------------------------------
def noisy_ct(shape: tuple[int, int, int]) -> Path:
    """A noisy CT head phantom (int16 HU) as .nii.gz, cached by shape and phantom code."""
    import medgen.samples
    from medgen.data.degrade_noise import GaussianNoise
    from medgen.io.nifti import write_nifti
    from medgen.volume import Volume, VolumeMeta

    version = hashlib.sha256(Path(medgen.samples.__file__).read_bytes()).hexdigest()[:10]
    path = CACHE / f"enhance-ct-{'x'.join(map(str, shape))}-{version}.nii.gz"
    if not path.is_file():
        spacing = tuple(f / n for f, n in zip(FIELD_OF_VIEW_MM, shape))
        hu, affine = medgen.samples.ct_head_phantom(shape, spacing, seed=7)
        noisy = GaussianNoise(sigma_fraction=NOISE_FRACTION, seed=0)(hu.astype(np.float32))
        stored = np.clip(np.rint(noisy), -1024, 3071).astype(np.int16)
        CACHE.mkdir(parents=True, exist_ok=True)
        write_nifti(Volume(stored, affine, VolumeMeta(modality="CT", units="HU")), path)
    return path


def central_block(array: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    starts = [max((s - c) // 2, 0) for s, c in zip(array.shape, shape)]
    return np.ascontiguousarray(array[tuple(slice(b, b + c) for b, c in zip(starts, shape))])


def load_models(names: list[str]):
    """``{name: (config, randomly initialised network)}`` from ``configs/``."""
    import torch

    from medgen.config import load_config
    from medgen.models import build_model

    out = {}
    for name in names:
        cfg = load_config(CONFIGS / MODEL_CONFIGS[name])
        torch.manual_seed(0)
        out[name] = (cfg, build_model(cfg).eval())
    return out


# -- sections ------------------------------------------------------------------------------
def window_plan(model, cfg, shape, device, amp: bool, level):
    """The windows medgen would choose for ``model`` on ``shape`` (probing GPU memory with ``amp``)."""
    import torch

    from medgen.inference.sliding import plan_windows

    if cfg.model.kind == "diffusion":
        def predictor(w):
            t = torch.zeros((w.shape[0],), dtype=torch.long, device=w.device)
            return model(w[:, :1], t, w[:, 1:2], level)

        multiple = 2 ** (len(cfg.model.diffusion.channels) - 1)
        return plan_windows(predictor, shape, device, in_channels=2, multiple=multiple, amp=amp)
    return plan_windows(lambda w: model(w, level), shape, device, multiple=16, amp=amp)


def bench_inference(bench: Bench, models, normalised: np.ndarray, diffusion_input: np.ndarray) -> None:
    from medgen.inference.enhance import estimate_noise_level, predict_array, sample_diffusion_array
    from medgen.inference.schedulers import sampling_scheduler

    a = bench.args
    for name, (cfg, model) in models.items():
        diffusion = cfg.model.kind == "diffusion"
        x = diffusion_input if diffusion else normalised
        level = estimate_noise_level(x) if cfg.model.noise_conditioning else None
        voxels = int(np.prod(x.shape))
        model = model.to(bench.device)
        if diffusion:
            d = cfg.model.diffusion
            scheduler = sampling_scheduler(a.diffusion_steps, d.num_train_timesteps, d.schedule, d.prediction_type)
            one_step = sampling_scheduler(1, d.num_train_timesteps, d.schedule, d.prediction_type)
        reference = None
        for v in variants(bench, with_channels_last=name == "unet" or bench.cuda):
            net = prepare(model, v, bench.device)
            plan = window_plan(model, cfg, x.shape, bench.device, v.amp, level)
            warm = None
            if diffusion:
                def run(net=net, v=v, plan=plan, steps=scheduler, n=a.diffusion_samples):
                    sample_diffusion_array(net, x, steps, n_samples=n, target_scale=d.target_scale,
                                           device=bench.device, plan=plan, amp=v.amp, noise_level=level)

                def warm(run=run):
                    run(steps=one_step, n=1)

                passes = a.diffusion_steps * a.diffusion_samples
            else:
                def run(net=net, v=v, plan=plan):
                    predict_array(net, x, device=bench.device, plan=plan, amp=v.amp, noise_level=level)
                passes = 1
            t = bench.time(run, warmup_fn=warm)
            note = f"window {'x'.join(map(str, plan.roi_vox))} batch {plan.batch}"
            if diffusion:
                note += (f"; {a.diffusion_steps} DDIM steps x {a.diffusion_samples} sample(s), "
                         f"{t.median_s / passes:.2f} s per network pass")
            if v.compile:
                note += f"; first call (compiling) {t.first_s:.0f} s"
            row = bench.add(Row.timed("inference", name, v.name, t, voxels, reference, note))
            reference = reference or row.key
            del net


def bench_training(bench: Bench, models) -> None:
    import torch

    from medgen.stages.train import build_objective
    from medgen.training.distributed import DistInfo
    from medgen.training.trainer import Trainer

    class CpuBf16Trainer(Trainer):
        """medgen's trainer with its autocast switched to CPU bf16 (medgen's AMP is CUDA-only)."""

        def autocast(self):
            return torch.autocast("cpu", dtype=torch.bfloat16)

    class FixedBatch:
        def __init__(self, batch):
            self._batch = batch

        def batch(self, step: int):
            return self._batch

    a = bench.args
    for name, (cfg, model) in models.items():
        patch = a.train_patch or tuple(cfg.data.patch_size_vox)
        batch_size = a.train_batch or cfg.training.batch_size
        g = torch.Generator().manual_seed(0)
        clean = torch.rand((batch_size, 1, *patch), generator=g)
        batch = {
            "clean": clean.to(bench.device),
            "degraded": (clean + 0.05 * torch.randn(clean.shape, generator=g)).to(bench.device),
            "noise_level": torch.full((batch_size,), 0.05, device=bench.device),
        }
        t_cfg = cfg.training
        reference = None
        for v in variants(bench, with_channels_last=name == "unet" or bench.cuda):
            torch.manual_seed(0)
            net = prepare(model, replace(v, cpu_bf16=False), bench.device)  # the trainer owns autocast
            trainer_cls = CpuBf16Trainer if v.cpu_bf16 else Trainer
            trainer = trainer_cls(
                net, build_objective(cfg), FixedBatch(batch), total_steps=10_000, lr=t_cfg.lr,
                weight_decay=t_cfg.weight_decay, lr_schedule=t_cfg.lr_schedule, warmup_steps=t_cfg.warmup_steps,
                grad_clip_norm=t_cfg.grad_clip_norm, ema_decay=t_cfg.ema_decay, amp=v.amp,
                dist=DistInfo(device=bench.device),
            )
            t = bench.time(trainer.train_step, warmup=a.warmup + 1)
            note = ""
            if reference is None:
                extra = " + critic update" if cfg.model.kind == "gan" else ""
                ema = ", EMA" if t_cfg.ema_decay else ""
                note = f"batch {batch_size} x {'x'.join(map(str, patch))}, AdamW{ema}{extra}"
            if v.compile:
                note += f"{'; ' if note else ''}first step (compiling) {t.first_s:.0f} s"
            row = bench.add(Row.timed("train step", name, v.name, t, batch_size * int(np.prod(patch)),
                                      reference, note))
            reference = reference or row.key
            del trainer, net


def bench_end_to_end(bench: Bench, models, ct_path: Path, diffusion_path: Path) -> None:
    from medgen.inference.enhance import enhance_with
    from medgen.inference.loading import LoadedModel
    from medgen.inference.schedulers import sampling_scheduler
    from medgen.io.nifti import read_nifti, write_nifti
    from medgen.stages.enhance import uncertainty_path

    a = bench.args
    with tempfile.TemporaryDirectory(prefix="bench-enhance-") as tmp:
        out = Path(tmp) / "enhanced.nii.gz"
        for name, (cfg, model) in models.items():
            diffusion = cfg.model.kind == "diffusion"
            source = diffusion_path if diffusion else ct_path
            options, warm_options = {}, None
            note = ""
            if diffusion:
                d = cfg.model.diffusion
                options = {"scheduler": sampling_scheduler(a.diffusion_steps, d.num_train_timesteps, d.schedule,
                                                           d.prediction_type),
                           "n_samples": a.diffusion_samples}
                warm_options = {"scheduler": sampling_scheduler(1, d.num_train_timesteps, d.schedule,
                                                                d.prediction_type), "n_samples": 1}
                note = f"{a.diffusion_steps} DDIM steps x {a.diffusion_samples} sample(s), uncertainty written; "
            loaded = LoadedModel(model=model.to(bench.device), config=cfg)
            voxels = int(np.prod(read_nifti(source).shape))
            settings = [("fp32", False), ("bf16 AMP (medgen amp)", True)] if bench.cuda else [("fp32", False)]
            reference = None
            for label, amp in settings:
                def run(amp=amp, options=options):
                    start = time.perf_counter()
                    volume = read_nifti(source)
                    read = time.perf_counter()
                    result = enhance_with(loaded, volume, device=bench.device, amp=amp, progress=False, **options)
                    enhanced = time.perf_counter()
                    write_nifti(result.volume, out)
                    if result.uncertainty is not None:
                        write_nifti(result.uncertainty, uncertainty_path(out))
                    return {"read": read - start, "enhance": enhanced - read, "write": time.perf_counter() - enhanced}

                warm = None if warm_options is None else (lambda run=run: run(options=warm_options))
                t = bench.time(run, warmup_fn=warm)
                split = ", ".join(f"{k} {v:.2f} s" for k, v in t.parts.items())
                default = "medgen enhance's setting; " if amp == bench.cuda else ""
                row = bench.add(Row.timed("end to end", name, label, t, voxels, reference,
                                          f"{default}{note}{split}"))
                reference = reference or row.key
        if not bench.cuda:
            bench.add(Row("end to end", "all", "bf16 AMP (medgen amp)", None,
                          note="skipped: medgen's AMP needs CUDA"))


def bench_classical(bench: Bench, values: np.ndarray, reference: str | None) -> None:
    from medgen.baselines.denoise import estimate_noise_sigma, gaussian_denoise, nlm_denoise
    from medgen.baselines.super_resolution import iterative_back_projection, sitk_upsample_slices, upsample_slices
    from medgen.data.degrade_resolution import ThickSlices

    tiny = np.zeros((8, 8, 8), np.float32)
    # Imports and first-call set-up outside the timings; no full warm-up run, since on a
    # 512x512x300 volume one NLM run takes minutes and nothing here compiles or autotunes.
    for warm in (lambda: nlm_denoise(tiny, 1.0), lambda: gaussian_denoise(tiny, 1.0),
                 lambda: upsample_slices(tiny, 2), lambda: sitk_upsample_slices(tiny, 2)):
        warm()
    sigma_hu = estimate_noise_sigma(values)
    k_even = values.shape[2] // 2 * 2
    thick = ThickSlices(factor=2)(values[..., :k_even])
    voxels, thin_voxels = int(values.size), int(thick.size * 2)
    cases = [
        ("gaussian", "sigma 1 vox", lambda: gaussian_denoise(values, 1.0), voxels, ""),
        ("nlm", "patch 3, distance 3", lambda: nlm_denoise(values, sigma_hu), voxels,
         f"skimage fast mode, sigma {sigma_hu:.0f} HU estimated beforehand; tuning h multiplies the time"),
        ("bspline x2", "cubic, slice axis", lambda: upsample_slices(thick, 2, order=3), thin_voxels,
         "thick slices (mean of 2) back onto the thin grid"),
        ("bspline x2", "SimpleITK", lambda: sitk_upsample_slices(thick, 2), thin_voxels, ""),
        ("ibp x2", "10 iterations", lambda: iterative_back_projection(thick, 2, n_iter=10), thin_voxels,
         "cubic B-spline + iterative back-projection"),
    ]
    for name, variant, fn, n_voxels, note in cases:
        t = measure(fn, lambda: None, 0, bench.args.repeats, bench.args.max_seconds_per_row)
        bench.add(Row.timed("classical", name, variant, t, n_voxels, reference, note))


# -- report --------------------------------------------------------------------------------
def machine_line(device) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        flags = ", AVX-512 BF16" if " avx512_bf16" in cpuinfo else ", no AVX-512 BF16"
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"{cpu} ({os.cpu_count()} logical CPUs{flags}, torch threads {torch.get_num_threads()}){gpu}; "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def table(rows: list[Row], markdown: bool) -> str:
    seconds = {r.key: r.seconds for r in rows}
    header = ["section", "model", "variant", "median s", "best s", "Mvox/s", "n", "speed-up", "vs", "note"]
    lines = []
    for r in rows:
        if r.seconds is None:
            cells = [r.section, r.model, r.variant, "-", "-", "-", "0", "-", "", r.note]
        else:
            base = seconds.get(r.reference) if r.reference else None
            speed = f"{base / r.seconds:.2f}x" if base else ""
            vs = ""
            if base:
                section, _, what = r.reference.partition(":")
                vs = what if section == r.section else f"{section} {what}"
            mvox = f"{r.voxels / r.seconds / 1e6:.3f}" if r.voxels else ""
            best = f"{r.best:.3f}" if r.best is not None else ""
            cells = [r.section, r.model, r.variant, f"{r.seconds:.3f}", best, mvox, str(r.runs), speed, vs, r.note]
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        out += ["| " + " | ".join(c.replace("|", "/") for c in cells) + " |" for cells in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(header)]
    widths[-1] = 0
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths[:-1]] + ["----"])] + [fmt(c) for c in lines])


def target_lines(bench: Bench, shape: tuple[int, int, int]) -> list[str]:
    a = bench.args
    lines = [f"Targets (H200, 512x512x300 CT): supervised end to end < {TARGET_E2E_UNET_S:.0f} s; "
             f"diffusion <= 20 steps < {TARGET_E2E_DIFFUSION_S:.0f} s; bf16 AMP >= {TARGET_AMP_SPEEDUP}x per training step."]
    if not bench.cuda:
        return lines + ["Not checked here: this run is on the CPU (GPU-only rows skipped)."]
    if shape != (512, 512, 300):
        lines.append(f"Note: volume is {'x'.join(map(str, shape))}, not 512x512x300.")

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    unet = [s for s in (bench.seconds_of("end to end:unet/fp32"),
                        bench.seconds_of("end to end:unet/bf16 AMP (medgen amp)")) if s is not None]
    if unet:
        lines.append(f"  supervised end to end: {min(unet):.2f} s  {verdict(min(unet) < TARGET_E2E_UNET_S)}")
    diff = [s for s in (bench.seconds_of("end to end:diffusion/fp32"),
                        bench.seconds_of("end to end:diffusion/bf16 AMP (medgen amp)")) if s is not None]
    if diff:
        lines.append(f"  diffusion end to end ({a.diffusion_steps} steps x {a.diffusion_samples} sample(s), "
                     f"{'x'.join(map(str, a.diffusion_volume))}): {min(diff):.2f} s  "
                     f"{verdict(min(diff) < TARGET_E2E_DIFFUSION_S)}")
    for name in MODEL_CONFIGS:
        fp32 = bench.seconds_of(f"train step:{name}/fp32")
        amp = bench.seconds_of(f"train step:{name}/bf16 AMP (medgen amp)")
        if fp32 and amp:
            lines.append(f"  AMP speed-up per training step, {name}: {fp32 / amp:.2f}x  "
                         f"{verdict(fp32 / amp >= TARGET_AMP_SPEEDUP)}")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    import torch

    notes = []
    if args.device == "cuda" and not torch.cuda.is_available():
        notes.append("--device cuda asked but CUDA is not available: running on the CPU, GPU-only rows skipped.")
        args.device = "cpu"
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    torch.set_num_threads(args.threads or (torch.get_num_threads() if cuda else min(2, os.cpu_count() or 2)))
    if cuda:
        torch.cuda.set_device(device)
    models = load_models(args.models)
    diffusion_cfg = models["diffusion"][0].model.diffusion if "diffusion" in models else None
    args.volume = args.volume or ((512, 512, 300) if cuda else (128, 128, 64))
    args.diffusion_volume = args.diffusion_volume or (args.volume if cuda else (64, 64, 32))
    if args.diffusion_steps is None:
        args.diffusion_steps = diffusion_cfg.sampling_steps if (cuda and diffusion_cfg) else 2
    if args.diffusion_samples is None:
        args.diffusion_samples = diffusion_cfg.n_samples if (cuda and diffusion_cfg) else 1

    from medgen.inference.normalise import IntensityNorm
    from medgen.io.nifti import read_nifti, write_nifti

    started = time.perf_counter()
    print(f"preparing a {'x'.join(map(str, args.volume))} CT phantom ...", file=sys.stderr, flush=True)
    ct_path = noisy_ct(args.volume)
    ct = read_nifti(ct_path)
    values = ct.values(np.float32)
    diffusion_path = ct_path
    if args.diffusion_volume != args.volume:
        block = central_block(np.asarray(ct.array), args.diffusion_volume)
        diffusion_path = CACHE / f"{ct_path.name[:-7]}-crop{'x'.join(map(str, block.shape))}.nii.gz"
        write_nifti(ct.with_array(block), diffusion_path)
    args.diffusion_volume = read_nifti(diffusion_path).shape
    norm = IntensityNorm.fit(values, "percentile", 0.5, 99.5)
    normalised = norm.forward(values)
    diffusion_input = norm.forward(read_nifti(diffusion_path).values(np.float32))

    bench = Bench(args, device)
    if "inference" in args.sections:
        bench_inference(bench, models, normalised, diffusion_input)
    if "train" in args.sections:
        bench_training(bench, models)
    if "e2e" in args.sections:
        bench_end_to_end(bench, models, ct_path, diffusion_path)
    if "classical" in args.sections:
        # The classical tools are compared with the U-Net's fp32 inference on the same voxels.
        reference = next((r.key for r in bench.rows if r.key == "inference:unet/fp32"), None)
        bench_classical(bench, values, reference)

    print()
    print(f"Machine: {machine_line(device)}")
    print(f"Volume: noisy CT head phantom {'x'.join(map(str, args.volume))} ({values.size / 1e6:.2f} Mvoxel, int16 HU "
          f".nii.gz); diffusion on {'x'.join(map(str, args.diffusion_volume))}. Untrained weights, configs: "
          + ", ".join(f"{k}={MODEL_CONFIGS[k]}" for k in args.models) + ".")
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"Median of up to {args.repeats} runs after {args.warmup} warm-up run(s) (training: {args.warmup + 1}); "
          f"1-min load average {load_before:.1f} before the run, {load_after:.1f} at its end (this run included); "
          f"total {time.perf_counter() - started:.0f} s.")
    if load_before > 0.5 * (os.cpu_count() or 1):
        notes.append("other processes were using the CPU when the run started; CPU rows may be slow and noisy "
                     "('best s' is the least disturbed run).")
    for note in notes:
        print(f"Note: {note}")
    if cuda:
        print("fp32 rows on CUDA use PyTorch's defaults (cuDNN convolutions may use TF32).")
    print()
    print(table(bench.rows, args.markdown))
    print()
    print("\n".join(target_lines(bench, args.volume)))


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    main()
