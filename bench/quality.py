"""Quality bench: per-scan adaptation against tuned classical baselines on the dev volumes.

Tasks (fixed, seeded degradations of the clean dev volumes in ``../shared/data/nifti``):

* ``mr-denoise``: ICBM152 T1 + Rician noise, sigma = 5% of the robust intensity span;
* ``ct-denoise``: head CT + Gaussian noise, sigma = 3% of the robust intensity span;
* ``mr-gaussian-denoise``: the T1 with the CT task's Gaussian 3% noise -- the dev CT is 96 %
  zeros (its "foreground" is the bright 3 %), so this is the check on dense soft tissue under
  Gaussian noise (not in the default run);
* ``mr-sr`` / ``ct-sr``: x2 thick slices along K (each thick slice the mean of two thin ones).

"Robust intensity span" is the 99.5th minus the 0.5th percentile of the whole clean volume
(:func:`medgen.data.degrade.robust_intensity_scale`; for this MR its 0.5th percentile is 0,
so it is the 99.5th percentile). PSNR and SSIM use that span as ``data_range``; the
foreground mask is :func:`medgen.metrics.masks.foreground_mask` of the whole clean volume.

Methods: the degraded input; the classical baselines at their best (every setting on a grid
scored against the clean volume, which only a benchmark can do), BM4D among them when the
``bm4d`` package is installed (``pip install bm4d``: non-commercial licence, so a benchmark
baseline only, never a medgen dependency; given the true sigma and, for MR, the best Rician
bias correction); the learned recipe pre-trained on *other* data without adaptation; the
recipe adapted to the scan (``medgen.adapt``); and medgen's three enhancement models -- U-Net,
GAN, conditional diffusion (few DDIM steps) -- trained on the other data, each with and
without ``--adapt``. For diffusion the per-voxel std over samples is checked against the real
error (Spearman correlation and a calibration table, :mod:`medgen.metrics.uncertainty`).

``--adapt-steps N`` gives SMORE a step budget (the clock, ``--adapt-seconds``, is then only a
cap) and ``--load-check`` repeats that run with two CPU-burning processes beside it, to show
the result does not depend on the machine's load. ``--smoke`` is the smallest mode (48^3
crops, a few steps of everything: minutes, numbers meaningless). Pre-training for the MR tasks uses the CT volume and phantoms, for the CT
tasks the MR volume and phantoms: never the voxels under test.

Run ``python bench/quality.py --help``; ``--out FILE`` writes the tables as Markdown (``bench/README.md`` holds the results).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "nifti"
MR_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
CT_FILE = "CT_AVM.nii.gz"
TASKS = ("mr-denoise", "ct-denoise", "mr-sr", "ct-sr", "mr-gaussian-denoise")
DEFAULT_TASKS = TASKS[:4]
MR_SIGMA_FRACTION = 0.05
CT_SIGMA_FRACTION = 0.03
#: Each denoising task's noise and its sigma as a fraction of the robust intensity span.
TASK_NOISE = {
    "mr-denoise": ("rician", MR_SIGMA_FRACTION),
    "ct-denoise": ("gaussian", CT_SIGMA_FRACTION),
    "mr-gaussian-denoise": ("gaussian", CT_SIGMA_FRACTION),
}
SR_FACTOR = 2


@dataclass
class Row:
    method: str
    psnr: float
    psnr_fg: float
    ssim: float
    ssim_fg: float
    seconds: float
    note: str = ""
    steps: str = ""


@dataclass
class Case:
    """One volume prepared for a task: clean crop, mask, data range and spacing."""

    name: str
    clean: np.ndarray
    mask: np.ndarray
    data_range: float
    spacing_mm: tuple[float, float, float]
    crop: tuple[slice, slice, slice]


def load_case(file: str, crop_vox: int) -> Case:
    from medgen.data.degrade import robust_intensity_scale
    from medgen.io.nifti import read_nifti
    from medgen.metrics.masks import foreground_mask

    vol = read_nifti(DATA / file)
    values = vol.values(np.float32)
    data_range = robust_intensity_scale(values)
    mask = foreground_mask(values)
    box = []
    for n in values.shape:
        w = n if crop_vox <= 0 else min(crop_vox, n)
        w -= w % SR_FACTOR  # whole thick slices along every axis
        start = (n - w) // 2
        box.append(slice(start, start + w))
    crop = tuple(box)
    return Case(file, np.ascontiguousarray(values[crop]), mask[crop], data_range, tuple(vol.spacing_mm), crop)  # type: ignore[arg-type]


def score(case: Case, x: np.ndarray, method: str, seconds: float, note: str = "", steps: object = "") -> Row:
    from medgen.metrics.quality import psnr, ssim

    r = case.data_range
    return Row(
        method,
        psnr(x, case.clean, r),
        psnr(x, case.clean, r, mask=case.mask),
        ssim(x, case.clean, r),
        ssim(x, case.clean, r, mask=case.mask),
        seconds,
        note,
        "" if steps is None else str(steps),
    )


def adapt_budget(args: argparse.Namespace) -> dict:
    """``seconds``/``max_steps`` for SMORE: the step budget rules when given, the clock is its cap."""
    return {"seconds": args.adapt_seconds or None, "max_steps": args.adapt_steps}


def timed(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _mse(x: np.ndarray, ref: np.ndarray) -> float:
    d = x.astype(np.float64) - ref
    return float(np.mean(d * d))


def other_volumes(task: str, crop_vox: int, log: Callable[[str], None]) -> list[np.ndarray]:
    """Clean training volumes that exclude the volume under test: the other dev volume + phantoms."""
    from medgen.samples import ct_head_phantom, mr_brain_phantom

    mr_task = task.startswith("mr")
    other = load_case(CT_FILE if mr_task else MR_FILE, crop_vox).clean
    vols = [other]
    side = 112 if crop_vox <= 0 or crop_vox >= 112 else crop_vox  # smaller only in --smoke-sized runs
    mm = 1.5 * 112 / side
    if mr_task:
        vols.append(mr_brain_phantom((side,) * 3, mm, seed=11, contrast="T1")[0])
        vols.append(mr_brain_phantom((side,) * 3, mm, seed=12, contrast="T2")[0])
    else:
        vols.append(ct_head_phantom((side,) * 3, (mm,) * 3, seed=13)[0].astype(np.float32))
    log(f"  pre-training data: other dev volume {other.shape} + {len(vols) - 1} phantom(s)")
    return vols


def train_unet(task: str, volumes: list[np.ndarray], spacing: tuple, args: argparse.Namespace,
               log: Callable[[str], None], kind: str = "unet"):
    """Train one of medgen's models on ``volumes`` (never the scan under test); returns it loaded.

    ``kind="unet"``: ``configs/denoise-mr.yaml`` / ``denoise-ct.yaml`` / ``sr-thick-mr.yaml``
    for ``--train-steps``; ``"gan"``: ``configs/gan-mr.yaml`` for ``--gan-steps``;
    ``"diffusion"``: ``configs/diffusion-mr.yaml`` with ``--diffusion-channels``, sampled with
    ``--ddim-steps`` DDIM steps and ``--diffusion-samples`` samples, for ``--diffusion-steps``.
    The bench's data, the task's degradation (the noise range covers its level) and, for SR,
    ``task: super_resolution`` with ``upsample_factor [1, 1, 2]``.
    """
    import tempfile

    import yaml

    from medgen.inference.loading import load_model
    from medgen.io import save
    from medgen.stages.train import train
    from medgen.volume import Volume

    work = Path(tempfile.mkdtemp(prefix="medgen-quality-"))
    paths = []
    for i, v in enumerate(volumes):
        paths.append(str(save(Volume(v, np.diag([*spacing, 1.0])), work / f"train{i}.nii.gz")))
    steps = {"unet": args.train_steps, "gan": args.gan_steps, "diffusion": args.diffusion_steps}[kind]
    if kind == "unet":
        base = {"ct-denoise": "denoise-ct"}.get(task, "denoise-mr" if task.endswith("denoise") else "sr-thick-mr")
    else:
        base = f"{kind}-mr"
    cfg = yaml.safe_load((REPO / "configs" / f"{base}.yaml").read_text())
    cfg["training"].update(steps=steps, out_dir=str(work / "run"), checkpoint_every=steps,
                           val_every=steps, warmup_steps=min(50, steps // 5))
    if kind != "unet" and not task.endswith("denoise"):
        cfg["model"].update(task="super_resolution", upsample_factor=[1, 1, SR_FACTOR], noise_conditioning=False)
    if kind == "diffusion":
        channels = [int(c) for c in args.diffusion_channels.split(",")]
        cfg["model"]["diffusion"].update(
            channels=channels, attention_levels=[False] * len(channels), norm_num_groups=min(16, channels[0]),
            sampling_steps=args.ddim_steps, n_samples=args.diffusion_samples,
        )
    patch = min(48, *(v.shape[0] for v in volumes))
    patch -= patch % 16
    cfg["data"]["patch_size_vox"] = [patch] * 3
    cfg["data"].update(train=paths[:-1], val=paths[-1:])
    if task.endswith("denoise"):
        noise_kind, frac = TASK_NOISE[task]
        cfg["degradations"] = [{"name": noise_kind, "params": {"sigma_fraction": [0.5 * frac, 1.5 * frac]}}]
    else:
        cfg["degradations"] = [{"name": "thick_slices", "params": {"factor": SR_FACTOR, "axis": 2}}]
    (work / "train.yaml").write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    summary = train(work / "train.yaml", tracking_uri=f"sqlite:///{work / 'mlflow.db'}", progress=False)
    log(f"  {kind} ({base}, {steps} steps) trained in {time.perf_counter() - t0:.0f} s")
    return load_model(summary.model_path), time.perf_counter() - t0


def unet_rows(loaded, degraded: np.ndarray, spacing, case: "Case", t_train: float, args: argparse.Namespace,
              label: str, extras: list[str] | None = None, adapt: bool = True) -> list[Row]:
    """The trained model on ``degraded`` as it is, then adapted to it (``medgen enhance --adapt``).

    A diffusion model's uncertainty map is checked against the real error; the lines go to
    ``extras`` (Markdown, printed under the task's table).
    """
    from medgen.adapt.with_model import adapt_with_model
    from medgen.inference.enhance import box_predictor, enhance_with
    from medgen.volume import Volume

    affine = np.diag([*spacing, 1.0])
    scan = Volume(degraded, affine)
    t0 = time.perf_counter()
    plain = enhance_with(loaded, scan)
    dt = time.perf_counter() - t0
    rows = [score(case, plain.volume.values(np.float32), f"{label}, no adaptation", dt, f"training {t_train:.0f} s")]
    if plain.uncertainty is not None and extras is not None:
        extras.append(uncertainty_report(case, plain.volume.values(np.float32), plain.uncertainty.values(np.float32), label))
    if not adapt:
        return rows

    predict = box_predictor(loaded, scan, plain)
    t0 = time.perf_counter()
    budget = adapt_budget(args)
    adapted = adapt_with_model(loaded, scan, plain.volume, budget["seconds"], max_steps=budget["max_steps"],
                               predict=predict, seed=args.seed)
    dt += time.perf_counter() - t0
    rec = adapted.records[0]
    params = rec.get("params", {})
    if "noise_sigma" in params:
        note, steps = f"sigma estimated {params['noise_sigma']:.3g}", "fit"
    else:
        note, steps = f"stopped by {params.get('stopped_by')}", rec.get("steps")
    rows.append(score(case, adapted.volume.values(np.float32), f"{label} + --adapt (ours)", dt, note, steps))
    return rows


def uncertainty_report(case: Case, mean: np.ndarray, std: np.ndarray, label: str) -> str:
    """Spearman(std, |mean - clean|) whole and foreground, and the calibration table (whole volume)."""
    from medgen.metrics.uncertainty import calibration_table, format_calibration, uncertainty_spearman

    error = mean - case.clean
    rho = uncertainty_spearman(std, error)
    rho_fg = uncertainty_spearman(std, error, case.mask)
    verdict = "tracks the error" if rho >= 0.5 and rho_fg >= 0.5 else "does NOT track the error well enough to serve as a safeguard"
    table = format_calibration(calibration_table(std, error, n_bins=5))
    return (f"Uncertainty check, {label}: Spearman(std, |error|) = {rho:.3f} whole, {rho_fg:.3f} foreground "
            f"-- the map {verdict} (threshold 0.5).\n\n{table}\n")


def best_rician_correction(out: np.ndarray, clean: np.ndarray, sigma: float, rician: bool) -> tuple[float, np.ndarray, str]:
    """``(mse, corrected, note)`` of the best Rician bias correction sqrt(max(x^2 - k sigma^2, 0)), k in {0, 1, 2}.

    A baseline's best case: the correction is chosen against the clean volume. Gaussian noise: ``out`` as it is.
    """
    if not rician:
        return _mse(out, clean), out, ""
    best = None
    for k in (0.0, 1.0, 2.0):
        x = np.sqrt(np.maximum(out * out - k * sigma * sigma, 0.0))
        m = _mse(x, clean)
        if best is None or m < best[0]:
            best = (m, x, f", Rician k={k:g}")
    return best


def bm4d_row(case: Case, noisy: np.ndarray, sigma: float, rician: bool, log: Callable[[str], None]) -> Row | None:
    """BM4D given the true sigma (and, for MR, the best Rician bias correction); None if not installed."""
    try:
        import bm4d  # non-commercial licence: a benchmark baseline only, never a medgen dependency
    except ImportError as error:
        log(f"  BM4D skipped: the `bm4d` package is not importable ({error}); `pip install bm4d` to add it")
        return None
    t0 = time.perf_counter()
    out = np.asarray(bm4d.bm4d(noisy.astype(np.float32), sigma), dtype=np.float32)
    dt = time.perf_counter() - t0
    _, x, correction = best_rician_correction(out, case.clean, sigma, rician)
    note = "true sigma" + correction
    log(f"  BM4D in {dt:.0f} s: best {note}")
    return score(case, x, "BM4D (true sigma" + (", + Rician correction)" if rician else ")"), dt, note)


def model_rows(task: str, others: list[np.ndarray], degraded: np.ndarray, spacing, case: Case,
               args: argparse.Namespace, log: Callable[[str], None], extras: list[str]) -> list[Row]:
    """U-Net, GAN and diffusion rows (``--models``), each without and with adaptation.

    For SR the adaptation (SMORE) does not use the model's output, so it is run once, with the
    U-Net (or the first model listed).
    """
    rows: list[Row] = []
    names = {"unet": "U-Net", "gan": "GAN", "diffusion": f"diffusion ({args.ddim_steps} DDIM steps x {args.diffusion_samples})"}
    done_sr_adapt = False
    for kind in [m.strip() for m in args.models.split(",") if m.strip()]:
        steps = {"unet": args.train_steps, "gan": args.gan_steps, "diffusion": args.diffusion_steps}[kind]
        if steps <= 0:
            continue
        if kind in args.model_file:  # trained before (e.g. by an earlier run of this bench): re-score it
            from medgen.inference.loading import load_model

            loaded, t_train = load_model(args.model_file[kind]), 0.0
            log(f"  {kind}: loaded {args.model_file[kind]} (not trained in this run)")
        else:
            loaded, t_train = train_unet(task, others, case.spacing_mm, args, log, kind=kind)
        # SR: SMORE ignores the model's output; with --only-models the SMORE rows come from the full run.
        adapt = task.endswith("denoise") or not (done_sr_adapt or args.only_models)
        label = f"{names[kind]} trained on other data"
        new = unet_rows(loaded, degraded, spacing, case, t_train, args, label, extras, adapt=adapt)
        log(table(new))  # as soon as scored: a long run that is stopped keeps what it measured
        rows += new
        done_sr_adapt = done_sr_adapt or not task.endswith("denoise")
    return rows


def run_denoise(task: str, case: Case, args: argparse.Namespace, log: Callable[[str], None],
                extras: list[str]) -> list[Row]:
    from medgen.adapt.denoise import adapt_denoise, pretrain_denoiser
    from medgen.baselines.denoise import gaussian_denoise, nlm_denoise
    from medgen.data.degrade import GaussianNoise, RicianNoise

    noise_kind, fraction = TASK_NOISE[task]
    rician = noise_kind == "rician"
    sigma = fraction * case.data_range
    noise_cls = RicianNoise if rician else GaussianNoise
    noisy = noise_cls(sigma=sigma, seed=args.seed)(case.clean)
    rows = [score(case, noisy, "degraded input", 0.0, f"sigma {sigma:.3g}")]
    if args.only_models:
        return rows + model_rows(task, other_volumes(task, args.crop, log), noisy, case.spacing_mm, case, args, log, extras)

    def best_of(candidates: dict[str, Callable[[], np.ndarray]], label: str) -> Row:
        best = None
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t0
            m, x, correction = best_rician_correction(out, case.clean, sigma, rician)
            if best is None or m < best[0]:
                best = (m, x, dt, name + correction)
        assert best is not None  # noqa: S101 - candidates is never empty here
        log(f"  {label}: best {best[3]}")
        return score(case, best[1], label, best[2], best[3])

    gauss = {f"sigma {s:g} vox": (lambda s=s: gaussian_denoise(noisy, s)) for s in (0.5, 0.75, 1.0, 1.25)}
    rows.append(best_of(gauss, "Gaussian smoothing (tuned)"))
    nlm = {
        f"patch {p}, search {d}, h {h:g} sigma": (lambda p=p, d=d, h=h: nlm_denoise(noisy, sigma, h_factor=h, patch_size=p, patch_distance=d))
        for p, d in ((3, 3), (5, 3))
        for h in (0.4, 0.6, 0.8, 1.0)
    }
    rows.append(best_of(nlm, "NLM (tuned" + (", + Rician correction)" if rician else ")")))
    if args.bm4d:
        row = bm4d_row(case, noisy, sigma, rician, log)
        if row is not None:
            rows.append(row)

    t0 = time.perf_counter()
    others = other_volumes(task, args.crop, log)
    pretrained = pretrain_denoiser(others, noise=noise_kind, sigma_fraction=fraction, seed=args.seed)
    t_pre = time.perf_counter() - t0
    out, dt = timed(lambda: adapt_denoise(noisy, case.spacing_mm, noise_sigma=sigma, noise=noise_kind, seconds=0, seed=args.seed, init_model=pretrained))
    rows.append(score(case, out, "SURE-LET, pre-trained on other data, no adaptation", dt, f"pre-training {t_pre:.0f} s"))
    # The SURE fit is a fixed amount of work: any positive budget runs it (--smoke's 0 must not skip it).
    fit_seconds = args.adapt_seconds or 1.0
    for known in (True, False):
        rec: dict = {}
        out, dt = timed(lambda: adapt_denoise(noisy, case.spacing_mm, noise_sigma=sigma if known else None, noise=noise_kind,
                                              seconds=fit_seconds, seed=args.seed, record=rec))
        label = "known sigma" if known else "sigma estimated"
        note = f"fit box {rec['params'].get('fit_box_vox')}" + ("" if known else f", sigma {rec['params']['noise_sigma']:.3g}")
        rows.append(score(case, out, f"SURE-LET adapted to the scan, {label}", dt, note, "fit"))
    rows += model_rows(task, others, noisy, case.spacing_mm, case, args, log, extras)
    return rows


def run_sr(task: str, case: Case, args: argparse.Namespace, log: Callable[[str], None],
           extras: list[str]) -> list[Row]:
    from medgen.adapt.super_resolution import adapt_super_resolution, pretrain_super_resolution
    from medgen.baselines.super_resolution import iterative_back_projection, naive_zoom, upsample_slices
    from medgen.data.degrade import ThickSlices

    axis = 2
    low = ThickSlices(factor=SR_FACTOR, axis=axis)(case.clean)
    spacing = list(case.spacing_mm)
    spacing[axis] *= SR_FACTOR
    rows = [score(case, np.repeat(low, SR_FACTOR, axis=axis), "degraded input (thick slices repeated)", 0.0)]
    if args.only_models:
        return rows + model_rows(task, other_volumes(task, args.crop, log), low, spacing, case, args, log, extras)
    out, dt = timed(lambda: naive_zoom(low, SR_FACTOR, axis=axis, order=3))
    rows.append(score(case, out, "cubic, corner-aligned zoom (misplaced)", dt, "negative control"))
    out, dt = timed(lambda: upsample_slices(low, SR_FACTOR, axis=axis, order=1))
    rows.append(score(case, out, "trilinear (grid-aligned)", dt))
    out, dt = timed(lambda: upsample_slices(low, SR_FACTOR, axis=axis, order=3))
    rows.append(score(case, out, "cubic B-spline (grid-aligned)", dt))
    best = None
    for n_iter in (5, 10, 20):
        out, dt = timed(lambda n=n_iter: iterative_back_projection(low, SR_FACTOR, axis=axis, n_iter=n))
        m = _mse(out, case.clean)
        if best is None or m < best[0]:
            best = (m, out, dt, n_iter)
    rows.append(score(case, best[1], "cubic B-spline + IBP (tuned)", best[2], f"{best[3]} iterations"))

    others = other_volumes(task, args.crop, log)
    rows += model_rows(task, others, low, spacing, case, args, log, extras)
    budget = adapt_budget(args)
    rec: dict = {}
    idle, dt = timed(lambda: adapt_super_resolution(low, spacing, factor=SR_FACTOR, axis=axis, seed=args.seed, record=rec, **budget))
    rows.append(score(case, idle, "SMORE adapted from scratch", dt, f"stopped by {rec['params'].get('stopped_by')}", rec.get("steps")))
    if args.load_check:
        rows.append(load_check_row(case, low, spacing, axis, idle, args, log))
    if args.pretrain_seconds <= 0:
        return rows
    t0 = time.perf_counter()
    pretrained, _ = pretrain_super_resolution(others, factor=SR_FACTOR, seconds=args.pretrain_seconds, seed=args.seed)
    t_pre = time.perf_counter() - t0
    out, dt = timed(lambda: adapt_super_resolution(low, spacing, factor=SR_FACTOR, axis=axis, seconds=0, seed=args.seed, init_model=pretrained))
    rows.append(score(case, out, "SMORE net, pre-trained on other data, no adaptation", dt, f"pre-training {t_pre:.0f} s"))
    rec = {}
    out, dt = timed(
        lambda: adapt_super_resolution(
            low, spacing, factor=SR_FACTOR, axis=axis, seed=args.seed, init_model=pretrained, record=rec, **budget
        )
    )
    rows.append(score(case, out, "SMORE pre-trained + adapted", dt, f"stopped by {rec['params'].get('stopped_by')}", rec.get("steps")))
    return rows


def load_check_row(case: Case, low: np.ndarray, spacing, axis: int, idle: np.ndarray, args: argparse.Namespace,
                   log: Callable[[str], None]) -> Row:
    """SMORE from scratch again with two CPU-burning processes beside it; same output as idle?"""
    from medgen.adapt.super_resolution import adapt_super_resolution

    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        rec: dict = {}
        loaded, dt = timed(lambda: adapt_super_resolution(low, spacing, factor=SR_FACTOR, axis=axis, seed=args.seed,
                                                          record=rec, **adapt_budget(args)))
    finally:
        for b in burners:
            b.kill()
            b.wait()
    same = bool(np.array_equal(loaded, idle))
    diff = float(np.max(np.abs(loaded - idle)))
    log(f"  load check: {rec.get('steps')} steps beside 2 CPU burners, identical to idle: {same} (max |diff| {diff:.3g})")
    return score(case, loaded, "SMORE adapted from scratch, 2 CPU burners beside it", dt,
                 f"identical to the idle run: {'yes' if same else f'no, max diff {diff:.3g}'}", rec.get("steps"))


def verdict(rows: list[Row], baseline_names: tuple[str, ...], ours: str) -> str:
    """How the recipe compares with the best baseline on each of the four numbers."""
    base = [r for r in rows if r.method.startswith(baseline_names)]
    mine = next((r for r in rows if r.method == ours), None)
    if mine is None or not base:
        return "not run"
    parts = []
    for key, unit in (("psnr", "dB"), ("psnr_fg", "dB"), ("ssim", ""), ("ssim_fg", "")):
        b = max(getattr(r, key) for r in base)
        d = getattr(mine, key) - b
        parts.append(f"{key} {d:+.2f} {unit}".rstrip() if unit else f"{key} {d:+.4f}")
    return "; ".join(parts)


def table(rows: list[Row]) -> str:
    lines = [
        "| method | PSNR whole (dB) | PSNR fg (dB) | SSIM whole | SSIM fg | seconds | steps | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r.method} | {r.psnr:.2f} | {r.psnr_fg:.2f} | {r.ssim:.4f} | {r.ssim_fg:.4f} | {r.seconds:.1f} | {r.steps} | {r.note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help=f"comma-separated subset of {', '.join(TASKS)} (default: the first four)")
    parser.add_argument("--crop", type=int, default=128, help="central crop side in voxels (0: whole volume)")
    parser.add_argument("--adapt-seconds", type=float, default=120.0,
                        help="clock budget of each SR adaptation; with --adapt-steps only a cap (0: no cap)")
    parser.add_argument("--adapt-steps", type=int, default=None, help="step budget of each SR adaptation (rules over the clock)")
    parser.add_argument("--load-check", action="store_true",
                        help="SR: repeat SMORE with 2 CPU-burning processes beside it (use with --adapt-steps)")
    parser.add_argument("--only-models", action="store_true",
                        help="only the degraded input and the --models rows (same seeded degradation as a full run)")
    parser.add_argument("--no-bm4d", dest="bm4d", action="store_false", help="skip BM4D even if installed")
    parser.add_argument("--models", default="unet,gan,diffusion", help="learned models to train and score")
    parser.add_argument("--model-file", action="append", default=[], metavar="KIND=PATH",
                        help="use this trained model file for a --models kind instead of training one (repeatable)")
    parser.add_argument("--gan-steps", type=int, default=300, help="GAN training steps (0: skip)")
    parser.add_argument("--diffusion-steps", type=int, default=300, help="diffusion training steps (0: skip)")
    parser.add_argument("--diffusion-channels", default="16,32,32", help="DiffusionModelUNet channels (CPU-sized)")
    parser.add_argument("--ddim-steps", type=int, default=4, help="DDIM sampling steps")
    parser.add_argument("--diffusion-samples", type=int, default=4, help="samples per voxel (mean = output, std = uncertainty)")
    parser.add_argument("--smoke", action="store_true",
                        help="smallest mode: 48^3 crops, 4 training steps per model, 20 SMORE steps (no clock cap), no pre-training")
    parser.add_argument("--pretrain-seconds", type=float, default=120.0, help="training budget of SR pre-training")
    parser.add_argument("--train-steps", type=int, default=300, help="U-Net training steps on the other data (0: skip)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the tables as Markdown here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.crop, args.train_steps, args.gan_steps, args.diffusion_steps = 48, 4, 4, 4
        args.adapt_steps, args.pretrain_seconds, args.ddim_steps, args.diffusion_samples = 20, 0.0, 2, 2
        args.adapt_seconds = 0.0  # no clock cap: the step budget alone ends SMORE, loaded or not
        args.diffusion_channels = "8,16"
    try:
        args.model_file = dict(item.split("=", 1) for item in args.model_file)
    except ValueError:
        print(f"--model-file takes KIND=PATH, got {args.model_file}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    if not DATA.is_dir():
        print(f"dev volumes not found at {DATA}", file=sys.stderr)
        return 2
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        if t not in TASKS:
            print(f"unknown task {t!r}; choose from {', '.join(TASKS)}", file=sys.stderr)
            return 2
    sections = []
    started = time.perf_counter()
    for task in tasks:
        t0 = time.perf_counter()
        case = load_case(MR_FILE if task.startswith("mr") else CT_FILE, args.crop)
        print(f"\n## {task}: {case.name}, crop {case.clean.shape}, data range {case.data_range:.4g}, "
              f"foreground {case.mask.mean():.0%} of the crop", flush=True)
        log = lambda msg: print(msg, flush=True)  # noqa: E731
        extras: list[str] = []
        if task.endswith("denoise"):
            rows = run_denoise(task, case, args, log, extras)
            ours = "U-Net trained on other data + --adapt (ours)"
            bases = ("Gaussian smoothing", "NLM", "BM4D")
        else:
            rows = run_sr(task, case, args, log, extras)
            ours = "U-Net trained on other data + --adapt (ours)"
            bases = ("trilinear", "cubic B-spline")
        text = table(rows)
        if extras:
            text += "\n\n" + "\n".join(extras)
        v = verdict(rows, bases, ours)
        print(text)
        print(f"ours vs best baseline: {v}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        sections.append(
            f"### {task} — `{case.name}`, crop {'x'.join(map(str, case.clean.shape))}, "
            f"foreground {case.mask.mean():.0%}\n\n{text}\n\nOurs against the best baseline: {v}.\n"
        )
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.out is not None:
        from medgen.io.atomic import atomic_write_bytes

        cmd = "python bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
        text = f"Reproduce: `{cmd.strip()}`\n\n" + "\n".join(sections)
        atomic_write_bytes(args.out, text.encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
