"""DICOM -> NIfTI conversion: medgen vs dcm2niix vs SimpleITK, whole process, one run.

Each tool runs as its own process on the same input (so start-up counts, as a user sees
it), writing gzipped NIfTI into a fresh folder. The table gives wall time, files/s, MB/s of
DICOM input, and whether the output matches the reference voxel for voxel (physical
affine within 0.02 mm after reorienting both to RAS; values compared after scaling,
since tools differ in what they store, e.g. SimpleITK applies the rescale).

    python bench/ingest.py                 # dev sets + a generated 300-slice 512x512 CT
    python bench/ingest.py --repeat 3      # best of 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "dicom"
CACHE = REPO / "bench" / ".cache"
AFFINE_TOLERANCE_MM = 0.02

SITK_SCRIPT = """
import sys, SimpleITK as sitk
from pathlib import Path
src, dst = sys.argv[1], Path(sys.argv[2])
reader = sitk.ImageSeriesReader()
for n, uid in enumerate(reader.GetGDCMSeriesIDs(src)):
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(src, uid, recursive=True))
    sitk.WriteImage(reader.Execute(), str(dst / f"series{n}.nii.gz"), useCompression=True)
"""


@dataclass
class Case:
    name: str
    src: Path
    references: list[tuple[np.ndarray, np.ndarray]]  # (RAS voxels, RAS affine) per volume


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool; best time kept")
    parser.add_argument("--slices", type=int, default=300, help="slices of the generated CT")
    parser.add_argument("--no-generated", action="store_true", help="dev sets only")
    args = parser.parse_args()

    cases = dev_cases()
    if not args.no_generated:
        cases.append(generated_ct_case(args.slices))
    tools = available_tools()
    print(f"{'case':<22} {'tool':<26} {'files':>5} {'MB':>7} {'wall s':>7} {'files/s':>8} {'MB/s':>7}  match")
    for case in cases:
        files = [p for p in case.src.rglob("*") if p.is_file()]
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        for tool, command in tools.items():
            best, out_dir = float("inf"), None
            for _ in range(args.repeat):
                out_dir = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
                start = time.perf_counter()
                done = subprocess.run(command(case.src, out_dir), capture_output=True, text=True)
                elapsed = time.perf_counter() - start
                best = min(best, elapsed)
                if done.returncode not in (0, 3):  # 3: medgen quarantined something
                    print(f"  {tool} failed: {done.stderr.strip().splitlines()[-1:]}")
            match = matches(out_dir, case.references)
            shutil.rmtree(out_dir, ignore_errors=True)
            print(f"{case.name:<22} {tool:<26} {len(files):>5} {megabytes:>7.1f} {best:>7.2f} "
                  f"{len(files) / best:>8.0f} {megabytes / best:>7.1f}  {match}")


def available_tools() -> dict:
    medgen = [str(Path(sys.executable).with_name("medgen")), "ingest"]
    tools = {
        "medgen": lambda src, dst: medgen + [str(src), "--out", str(dst), "--quiet"],
        "medgen --workers 2": lambda src, dst: medgen + [str(src), "--out", str(dst), "--quiet", "--workers", "2"],
        "SimpleITK SeriesReader": lambda src, dst: [sys.executable, "-c", SITK_SCRIPT, str(src), str(dst)],
    }
    if shutil.which("dcm2niix"):
        pigz = " (pigz)" if shutil.which("pigz") else " (internal)"
        tools["dcm2niix -z y" + pigz] = lambda src, dst: ["dcm2niix", "-z", "y", "-o", str(dst), str(src)]
        tools["dcm2niix -z n (no gzip)"] = lambda src, dst: ["dcm2niix", "-z", "n", "-o", str(dst), str(src)]
    return tools


def dev_cases() -> list[Case]:
    if not SHARED.is_dir():
        print(f"note: {SHARED} not found; dev sets skipped")
        return []
    ts = SHARED / "dcm_qa_ts"
    enh = SHARED / "dcm_qa_enh"
    return [
        Case("dcm_qa_ts (9 syntaxes)", ts / "In", [load_ras(ts / "Ref" / f"{n}.nii") for n in range(1, 10)]),
        Case("enhanced Siemens 4D", enh / "In" / "Siemens",
             [load_ras(enh / "Ref" / "Siemens_REST1_w_SMS_PF7-8_6.nii")]),
        Case("enhanced Philips", enh / "In" / "Philips",
             [load_ras(enh / "Ref" / f"Philips_WIP_B0_NS_801_{p}.nii") for p in ("e1", "e2_fieldmaphz")]),
    ]


def generated_ct_case(n_slices: int) -> Case:
    """A 512x512 CT head phantom in HU, written once as an ORIGINAL series and cached.

    The cache is keyed by the phantom code's hash, and keeps the reference as NIfTI beside
    the series, so later runs neither regenerate the phantom nor compare to a stale one.
    """
    import hashlib

    import medgen.samples

    version = hashlib.sha256(Path(medgen.samples.__file__).read_bytes()).hexdigest()[:10]
    folder = CACHE / f"ct512x512x{n_slices}-{version}"
    series, reference = folder / "series", folder / "reference.nii"
    if not reference.is_file():
        from medgen.io.dicom_writer import write_dicom_series
        from medgen.volume import Volume, VolumeMeta

        hu, affine = medgen.samples.ct_head_phantom((512, 512, n_slices), (0.45, 0.45, 0.625), seed=7)
        stored = (hu.astype(np.int32) + 1024).astype(np.int16)
        volume = Volume(stored, affine, VolumeMeta(modality="CT", units="HU"), 1.0, -1024.0)
        write_dicom_series(volume, series, image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
                           series_description="bench CT", uid_seed=f"bench-{n_slices}", overwrite=True)
        nib.save(nib.Nifti1Image(hu, affine), reference)
    return Case(f"CT 512x512x{n_slices}", series, [load_ras(reference)])


def load_ras(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Physical values (scaling applied): tools differ in what they store, not in what it means."""
    img = nib.load(path)
    return ras(img.get_fdata(dtype=np.float64), img.affine)


def ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
    return np.asarray(img.dataobj), img.affine


def matches(out_dir: Path, references: list[tuple[np.ndarray, np.ndarray]]) -> str:
    """'yes' when every reference volume has an output with the same voxels and affine."""
    outputs = [load_ras(p) for p in sorted(out_dir.rglob("*.nii*"))]
    found = 0
    for ref_data, ref_affine in references:
        for data, affine in outputs:
            tolerance = 1e-4 * float(np.abs(ref_data).max() or 1.0)  # float32 scaling fields
            if (data.shape == ref_data.shape and np.allclose(data, ref_data, rtol=1e-4, atol=tolerance)
                    and np.abs(affine - ref_affine).max() < AFFINE_TOLERANCE_MM):
                found += 1
                break
    return "yes" if found == len(references) else f"no ({found}/{len(references)} volumes)"


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    main()
