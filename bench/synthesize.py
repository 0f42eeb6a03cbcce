"""Synthesis bench: DDPM (1000 steps), DDIM and rectified flow (few steps), a normalizing flow (one pass).

One run, on this machine:

1. a labelled phantom cohort (:func:`medgen.samples_cohort.write_cohort`, task "lesion"):
   ``--n-train`` per class to train on, ``--n-heldout`` per class held back as "real";
2. a 3D KL autoencoder (L1 + KL + patch-adversarial) on the cohort's grid; its
   reconstruction PSNR/SSIM (whole and foreground) on the held-back phantoms and on the real
   ICBM T1 brain volume it never saw (``../shared/data``, resampled to the cohort's grid);
3. two label-conditioned latent diffusion models on the autoencoder's latents, identical but
   for their training: DDPM (noise prediction) and rectified flow; and (unless
   ``--skip-flow``) a label-conditioned normalizing flow over the same whole latent grids
   (``model.kind: flow``, ``regions: null``), on the same training scans;
4. for each sampler (DDPM 1000 steps, DDIM ``--steps``, rectified flow ``--steps``, the
   normalizing flow at each of ``--flow-temperatures``), ``--n-samples`` volumes (half per
   class): seconds and peak memory per volume, Frechet distance and MMD in medgen's own
   contrastive 3D feature space (trained once here on the training cohort), two-sample AUC
   (0.5 = indistinguishable), MS-SSIM diversity beside the real set's, and the fraction of
   samples flagged as copies of a training volume (with its chance rate). A "copies of
   training volumes" row shows what memorisation looks like, and "held-back real" what a
   perfect generator would score at this set size.
5. split (slab) against whole decoding of a large latent: peak memory and the largest
   difference;
6. (with ``../shared/data``) an autoencoder trained patch-based at native 1 mm on real
   anatomy: the inferior half of the ICBM T1 volume; its reconstruction of the superior
   half (anatomy it never saw) and of the head CT (a volume it never saw).

Peak memory is what a row adds at its peak, measured in a fresh process per row: the
resident-set high-water mark minus the resident set when generation (or decoding) began, after
the model was loaded (CPU), or ``torch.cuda.max_memory_allocated`` (GPU). ``--quick`` shrinks everything for a smoke test.
Run ``python bench/synthesize.py --help``; results go in ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "nifti"
MR_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


class PeakMemory:
    """Memory a block adds at its peak, in MB: on CUDA torch's peak allocation; on the CPU the
    process's resident-set high-water mark minus the resident set when the block began. Run
    each measured block in a fresh process (:func:`in_fresh_process`): freed memory that the
    allocator keeps would hide what a later block needs."""

    def __init__(self, device: str) -> None:
        self.device, self.peak_mb = device, 0.0

    def __enter__(self) -> PeakMemory:
        import torch

        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident set
            self._start = _rss_mb()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.peak_mb = _hwm_mb() - self._start


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a new (spawned) Python process, so its memory peak is its own."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def vae_config(work: Path, name: str, args, device: str, data: dict) -> Path:
    """The bench's autoencoder config (the demo's architecture, ``args.ae_steps`` steps)."""
    return write_yaml(work / f"{name}.yaml", {
        "name": f"bench-{name}", "experiment": "bench-synthesis",
        "model": {"kind": "autoencoder",
                  "autoencoder": {"channels": [16, 32, 32], "latent_channels": 3, "norm_num_groups": 8},
                  "discriminator": {"channels": 16, "num_layers_d": 2}},
        "training": {"steps": args.ae_steps, "batch_size": 2, "lr": 1e-3, "warmup_steps": 20, "ema_decay": None,
                     "val_every": 10**6, "checkpoint_every": 10**6, "log_every": 50, "device": device,
                     "out_dir": str(work / name),
                     "loss": {"kl": 1e-6, "adversarial": 0.005, "adversarial_start_step": args.ae_steps // 2}},
        "data": data,
    })  # fmt: skip


def train_models(work: Path, args, device: str) -> dict[str, Path]:
    uri = f"sqlite:///{work / 'mlflow.db'}"
    grid = {"shape_vox": [args.size] * 3, "spacing_mm": [96.0 / args.size] * 3}
    common = {"device": device, "log_every": 50, "checkpoint_every": 10**6}
    ae = vae_config(work, "vae", args, device, {
        "labels_csv": str(work / "train" / "labels.csv"), "val_fraction": 0.1, "grid": grid})  # fmt: skip
    ae_model = reused(work, "vae", args) or timed_train(ae, uri, f"autoencoder: {args.ae_steps} steps")
    models = {"autoencoder": ae_model}
    for training in ("ddpm", "rflow"):
        cfg = write_yaml(work / f"ldm-{training}.yaml", {
            "name": f"bench-ldm-{training}", "experiment": "bench-synthesis",
            "model": {"kind": "latent_diffusion", "latent_diffusion": {
                "autoencoder": str(ae_model), "channels": [32, 64], "attention_levels": [False, True],
                "norm_num_groups": 16, "num_head_channels": 16, "num_classes": 2, "training": training,
                "sampler": "rflow" if training == "rflow" else "ddim"}},
            "training": {"steps": args.ldm_steps, "batch_size": 4, "lr": 1e-3, "warmup_steps": 20,
                         "ema_decay": 0.995, "val_every": 10**6, "out_dir": str(work / f"ldm-{training}"), **common},
            "data": {"labels_csv": str(work / "train" / "labels.csv")},
        })  # fmt: skip
        models[training] = reused(work, f"ldm-{training}", args) or timed_train(
            cfg, uri, f"latent diffusion ({training}): {args.ldm_steps} steps")
    if not args.skip_flow:
        models["flow"] = train_flow(work, args, ae_model, uri, common)
    return models


def train_flow(work: Path, args, ae_model: Path, uri: str, common: dict) -> Path:
    """The normalizing flow over whole latent grids (decodable), on the latent diffusion
    models' training scans: its held-back fraction equals their ``val_fraction`` (0.1) and
    the split is stratified with the same seed."""
    cfg = write_yaml(work / "flow.yaml", {
        "name": "bench-flow", "experiment": "bench-synthesis",
        "model": {"kind": "flow", "flow": {
            "autoencoder": str(ae_model), "regions": None, "intensity_descriptors": False, "num_classes": 2,
            "transforms": 3, "hidden_features": [64], "bins": 4, "feature_noise": 0.1, "calibration_fraction": 0.1}},
        "training": {"steps": args.flow_steps, "batch_size": 16, "lr": 1e-3, "weight_decay": 1e-4, "warmup_steps": 50,
                     "ema_decay": 0.99, "val_every": 10**6, "out_dir": str(work / "flow"), **common},
        "data": {"labels_csv": str(work / "train" / "labels.csv")},
    })  # fmt: skip
    return reused(work, "flow", args) or timed_train(cfg, uri, f"normalizing flow: {args.flow_steps} steps")


def reused(work: Path, name: str, args) -> Path | None:
    """With ``--reuse``, the model an earlier run of the same settings left in ``work``."""
    path = work / name / "model.pt"
    if args.reuse and path.is_file():
        print(f"{name}: reusing {path}")
        return path
    return None


def timed_train(cfg: Path, uri: str, what: str) -> Path:
    from medgen.stages.train import train

    started = time.perf_counter()
    path = train(cfg, tracking_uri=uri, progress=False, resume=False).model_path
    print(f"{what} in {time.perf_counter() - started:.0f} s")
    return path


def load_grid_set(folder: Path, shape, spacing) -> np.ndarray:
    """A cohort folder on the synthesis grid, each volume normalised to [0, 1]."""
    from medgen.stages.evaluate_synthesis import load_folder, volumes_on_grid

    return volumes_on_grid(load_folder(folder, str(folder)), shape, spacing)


def reconstruction_rows(ae_path: Path, work: Path, args, device: str) -> list[tuple]:
    """Autoencoder reconstruction of held-back phantoms and of the unseen real T1 volume."""
    import torch

    from medgen.data.synthesis_data import onto_grid
    from medgen.inference.loading import load_model
    from medgen.inference.normalise import IntensityNorm
    from medgen.metrics.masks import foreground_mask
    from medgen.metrics.quality import quality_report
    from medgen.stages.common import load_volume
    from medgen.stages.train_synthesis import reconstruct

    ae = load_model(ae_path, device=device).model
    spacing = [96.0 / args.size] * 3
    sets = {"held-back phantoms": sorted((work / "heldout").glob("*.nii.gz"))}
    if (DATA / MR_FILE).is_file():
        sets["real ICBM T1 (unseen)"] = [DATA / MR_FILE]
    rows = []
    for name, files in sets.items():
        reports = []
        for f in files:
            values, _ = onto_grid(load_volume(f), [args.size] * 3, spacing if "ICBM" not in name else [200.0 / args.size] * 3)
            x = IntensityNorm.fit(values).forward(values)
            out = reconstruct(ae, x, torch.device(device))
            reports.append(quality_report(out, x, 1.0, mask=foreground_mask(x)))
        mean = {k: float(np.mean([r[k] for r in reports])) for k in reports[0]}
        rows.append((name, len(files), mean["psnr"], mean["psnr_fg"], mean["ssim"], mean["ssim_fg"]))
    return rows


def reconstructed(ae_path: Path, volumes: np.ndarray, device: str) -> np.ndarray:
    """``volumes`` (each in [0, 1]) through the autoencoder and back: the most any generator
    decoding its latents can show (a decoder that smooths away what tells scans apart caps
    every generator's diversity)."""
    import torch

    from medgen.inference.loading import load_model
    from medgen.inference.normalise import IntensityNorm
    from medgen.stages.evaluate_synthesis import normalise_percentiles
    from medgen.stages.train_synthesis import reconstruct

    ae = load_model(ae_path, device=device).model
    return np.stack([normalise_percentiles(reconstruct(ae, IntensityNorm.fit(v).forward(v), torch.device(device)))
                     for v in volumes])


def generate(model_path: Path, sampler: str | None, steps: int | None, n: int, device: str, threads: int = 0,
             temperature: float | None = None):  # fmt: skip
    """(images, seconds per volume, peak MB added while generating); run in a fresh process.
    A flow takes ``temperature`` and no sampler or steps."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from medgen.inference.loading import load_synthesis_model
    from medgen.inference.synthesis import SynthesisRequest

    synth = load_synthesis_model(model_path, device=device)
    images, started = [], time.perf_counter()
    with PeakMemory(device) as peak:
        for i in range(n):
            request = SynthesisRequest(n=1, condition={"label": i % 2}, seed=0, sampler=sampler, steps=steps,
                                       first_index=i, temperature=temperature)  # fmt: skip
            images.append(synth.generate(request, device=device)[0].values(np.float32))
    return np.stack(images), (time.perf_counter() - started) / n, peak.peak_mb


def decode_once(ae_path: Path, device: str, latent_side: int, slab: int | None, threads: int = 0):
    """(output, seconds, peak MB added) of decoding a seeded latent; run in a fresh process."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from medgen.inference.loading import load_model
    from medgen.inference.synthesis import decode_latents
    from medgen.models.latent_diffusion import LatentDenoiser, LatentDiffusionModel

    ae = load_model(ae_path, device=device).model
    model = LatentDiffusionModel(ae, LatentDenoiser(latent_channels=3, channels=(16,), attention_levels=(False,),
                                                    norm_num_groups=8, num_head_channels=16)).to(device)  # fmt: skip
    z = torch.randn(1, 3, latent_side, latent_side, latent_side, generator=torch.Generator().manual_seed(0)).to(device)
    started = time.perf_counter()
    with PeakMemory(device) as peak:
        out = decode_latents(model, z, slab_latent_vox=slab).float().cpu().numpy()
    return out, time.perf_counter() - started, peak.peak_mb


def split_decode_rows(ae_path: Path, device: str, latent_side: int, slab: int, threads: int = 0) -> list[tuple]:
    whole, seconds, peak = in_fresh_process(decode_once, ae_path, device, latent_side, None, threads)
    split, split_seconds, split_peak = in_fresh_process(decode_once, ae_path, device, latent_side, slab, threads)
    return [("whole", seconds, peak, 0.0),
            (f"slabs of {slab} latent voxels", split_seconds, split_peak, float(np.abs(split - whole).max()))]


def real_anatomy_rows(work: Path, args, device: str) -> list[tuple]:
    """Patch-based autoencoder on the ICBM T1's inferior half; scored on unseen anatomy."""
    import torch

    from medgen.inference.loading import load_model
    from medgen.inference.normalise import IntensityNorm
    from medgen.io.nifti import write_nifti
    from medgen.metrics.masks import foreground_mask
    from medgen.metrics.quality import quality_report
    from medgen.stages.common import load_volume
    from medgen.stages.train_synthesis import reconstruct
    from medgen.volume import Volume

    t1 = load_volume(DATA / MR_FILE)
    values = t1.values(np.float32)
    split = values.shape[2] // 2
    lower = Volume(values[:, :, :split], t1.affine, t1.meta.copy())
    write_nifti(lower, work / "icbm_inferior.nii.gz")
    cfg = vae_config(work, "vae-real", args, device,
                     {"train": [str(work / "icbm_inferior.nii.gz")], "patch_size_vox": [32, 32, 32]})
    path = reused(work, "vae-real", args) or timed_train(cfg, f"sqlite:///{work / 'mlflow.db'}",
                                                         f"real-anatomy autoencoder: {args.ae_steps} steps")
    model = load_model(path, device=device).model
    cases = {"ICBM T1 superior half (unseen anatomy)": values[:, :, split:],
             "ICBM T1 inferior half (trained on)": values[:, :, :split]}  # fmt: skip
    if (DATA / "CT_AVM.nii.gz").is_file():
        cases["head CT (unseen volume)"] = load_volume(DATA / "CT_AVM.nii.gz").values(np.float32)
    rows = []
    for name, array in cases.items():
        # A central crop of at most --real-crop voxels per axis: scoring whole volumes in
        # overlapping 32^3 patches does not fit a CPU run.
        side = [min(n, args.real_crop) // 4 * 4 for n in array.shape]
        start = [(n - s) // 2 for n, s in zip(array.shape, side)]
        crop = array[tuple(slice(a, a + s) for a, s in zip(start, side))]
        x = IntensityNorm.fit(crop).forward(crop)
        out = reconstruct(model, x, torch.device(device), patch_vox=(32, 32, 32))  # as trained
        r = quality_report(out, x, 1.0, mask=foreground_mask(x))
        rows.append((name, "x".join(map(str, crop.shape)), r["psnr"], r["psnr_fg"], r["ssim"], r["ssim_fg"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "bench_out" / "synthesize")
    parser.add_argument("--size", type=int, default=48, help="grid side in voxels (96 mm field of view)")
    parser.add_argument("--n-train", type=int, default=20, help="training phantoms per class")
    parser.add_argument("--n-heldout", type=int, default=8, help="held-back phantoms per class")
    parser.add_argument("--ae-steps", type=int, default=1500)
    parser.add_argument("--ldm-steps", type=int, default=2000)
    parser.add_argument("--flow-steps", type=int, default=1500, help="normalizing flow training steps")
    parser.add_argument("--flow-temperatures", type=float, nargs="+", default=[1.0, 0.7],
                        help="a normalizing flow row per base-noise temperature")
    parser.add_argument("--skip-flow", action="store_true", help="no normalizing flow rows")
    parser.add_argument("--skip-samplers", nargs="*", default=[], choices=["ddpm", "ddim", "rflow"],
                        help="leave these latent diffusion rows out (e.g. to add the flow to an earlier run)")
    parser.add_argument("--encoder-steps", type=int, default=300)
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25, help="DDIM / rectified-flow steps")
    parser.add_argument("--ddpm-steps", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--decode-latent", type=int, default=40, help="latent side for the decoding rows (x4 voxels)")
    parser.add_argument("--skip-real", action="store_true", help="skip the real-anatomy autoencoder")
    parser.add_argument("--real-crop", type=int, default=96, help="real-anatomy scoring: central crop side (voxels)")
    parser.add_argument("--reuse", action="store_true", help="reuse models an earlier run left in --work")
    parser.add_argument("--only-real", action="store_true", help="only the real-anatomy autoencoder rows")
    parser.add_argument("--quick", action="store_true", help="tiny everything: a smoke test, not a result")
    args = parser.parse_args()
    if args.quick:
        args.size, args.n_train, args.n_heldout, args.ae_steps, args.ldm_steps, args.flow_steps = 32, 4, 2, 10, 10, 10
        args.encoder_steps, args.n_samples, args.steps, args.ddpm_steps = 10, 4, 3, 20
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from medgen.samples_cohort import write_cohort
    from medgen.stages.evaluate_synthesis import normalise_percentiles, synthesis_report, train_feature_encoder

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    if args.only_real:
        real_anatomy_table(work, args)
        return
    shape = (args.size,) * 3
    write_cohort(work / "train", n_per_class=args.n_train, seed=0, shape=shape)
    write_cohort(work / "heldout", n_per_class=args.n_heldout, seed=1, shape=shape)
    models = train_models(work, args, args.device)

    print("\n## Autoencoder reconstruction (4x compression per axis, 3 latent channels)\n")
    print("| volumes | n | PSNR dB | PSNR fg dB | SSIM | SSIM fg |\n|---|---|---|---|---|---|")
    for row in reconstruction_rows(models["autoencoder"], work, args, args.device):
        print("| {} | {} | {:.2f} | {:.2f} | {:.4f} | {:.4f} |".format(*row))

    spacing = (96.0 / args.size,) * 3
    train_set = load_grid_set(work / "train", shape, spacing)
    real = load_grid_set(work / "heldout", shape, spacing)
    encoder = train_feature_encoder(train_set, steps=args.encoder_steps, seed=0)
    arms = [(f"DDPM ({args.ddpm_steps} steps)", "ddpm", "ddpm", args.ddpm_steps, None),
            (f"DDIM ({args.steps} steps)", "ddpm", "ddim", args.steps, None),
            (f"rectified flow ({args.steps} steps)", "rflow", "rflow", args.steps, None)]  # fmt: skip
    arms = [arm for arm in arms if arm[2] not in args.skip_samplers]
    if "flow" in models:  # one exact inverse pass; the temperature scales the base noise
        arms += [(f"normalizing flow (1 pass, T={t:g})", "flow", None, None, t) for t in args.flow_temperatures]
    rows = []
    for name, model_key, sampler, steps, temperature in arms:
        images, seconds, peak = in_fresh_process(generate, models[model_key], sampler, steps, args.n_samples,
                                                 args.device, args.threads, temperature)
        report = synthesis_report(np.stack([normalise_percentiles(v) for v in images]), real, train_set, encoder)
        rows.append((name, seconds, peak, report))
    rng = np.random.default_rng(0)
    copies = train_set[rng.choice(len(train_set), size=args.n_samples, replace=len(train_set) < args.n_samples)]
    rows.append(("copies of training volumes", float("nan"), float("nan"), synthesis_report(copies, real, train_set, encoder)))
    rows.append(("autoencoder reconstructions of those copies", float("nan"), float("nan"),
                 synthesis_report(reconstructed(models["autoencoder"], copies, args.device), real, train_set, encoder)))
    half = len(real) // 2
    rows.append(("held-back real (half)", float("nan"), float("nan"), synthesis_report(real[:half], real[half:], train_set, encoder)))

    print("\n## Generators side by side (same autoencoder and training scans; medgen3d = medgen's contrastive 3D encoder)\n")
    print("| generator | s / volume | peak MB added | FID medgen3d | MMD rbf | two-sample AUC | MS-SSIM diversity (real) | copies flagged (chance) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, seconds, peak, report in rows:
        m = report["metrics"]
        print(f"| {name} | {seconds:.2f} | {peak:.0f} | {m['synthesis/fid_medgen3d']:.3g} | {m['synthesis/mmd_rbf_medgen3d']:.4f} "
              f"| {m['synthesis/two_sample_auc_medgen3d']:.3f} | {m['synthesis/diversity_msssim_synth']:.3f} "
              f"({m['synthesis/diversity_msssim_real']:.3f}) | {m['synthesis/memorisation_fraction_flagged']:.2f} "
              f"({m['synthesis/memorisation_chance_fraction']:.2f}) |")

    side = 8 if args.quick else args.decode_latent
    print(f"\n## Decoding a {side * 4}^3 volume from its {side}^3 latent\n")
    print("| decoding | seconds | peak MB added | max abs difference to whole |\n|---|---|---|---|")
    for row in split_decode_rows(models["autoencoder"], args.device, side, max(2, side // 5), args.threads):
        print("| {} | {:.2f} | {:.0f} | {:.4f} |".format(*row))

    if not args.skip_real:
        real_anatomy_table(work, args)


def real_anatomy_table(work: Path, args) -> None:
    if not (DATA / MR_FILE).is_file():
        print(f"\nreal-anatomy rows skipped: {DATA / MR_FILE} not found")
        return
    print("\n## Autoencoder on real anatomy (patch-based, native 1 mm, 4x compression per axis)\n")
    print("| volume | voxels | PSNR dB | PSNR fg dB | SSIM | SSIM fg |\n|---|---|---|---|---|---|")
    for row in real_anatomy_rows(work, args, args.device):
        print("| {} | {} | {:.2f} | {:.2f} | {:.4f} | {:.4f} |".format(*row))


if __name__ == "__main__":
    main()
