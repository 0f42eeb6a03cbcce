"""``medgen ingest`` on broken input (issue 9): every bad file is one line, the run goes on.

Each test builds a broken file beside a good series and asserts facts: the good series is
converted, the exit status, the line names the file and the problem, nothing reaches stderr
as a traceback or a raw library warning.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medgen.archive import Manifest
from medgen.cli import app
from medgen.stages.ingest import ingest
from tests.dicom_factory import (
    claim_deflate,
    deflate_bomb,
    jpeg2000_bomb,
    set_unknown_vr,
    voxel_pattern,
    write_series,
)

runner = CliRunner()


def _is_series(name: str, number: int) -> bool:
    """True for the output name of series ``number`` (``<key>_s<number>[_...].nii.gz``)."""
    return re.search(rf"_s{number}[._]", name) is not None


def _good(src: Path) -> list[Path]:
    return write_series(src / "good", shape=(4, 4, 3), series_number=9)


def _named(dst: Path, rel: str) -> str:
    """How ingest into ``dst`` names the file at ``rel`` under SRC (a pseudonym by default)."""
    from medgen.stages.ingest_names import SourceNames

    return SourceNames.for_output(dst).path(rel)


def _lines(summary) -> dict[str, str]:
    return dict(summary.quarantined)


def _fates(dst: Path) -> dict[str, tuple[str, str]]:
    with Manifest.open(dst) as m:
        return {f.path: (f.fate, f.detail) for f in m.files()}


def _assert_good_converted(summary) -> None:
    outs = [p for p in summary.volumes_written if _is_series(p.name, 9)]
    assert len(outs) == 1 and nib.load(outs[0]).shape == (4, 4, 3)


# -- 5. any failure while reading one file is that file's one-line reason ---------------------


def test_file_claiming_deflate_that_is_not_deflated(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "out"
    bad = claim_deflate(write_series(src / "bad", shape=(4, 4, 3), series_number=2)[0])
    _good(src)
    summary = ingest(src, dst, progress=False)
    rel = _named(dst, bad.relative_to(src).as_posix())
    assert "unreadable DICOM header (error: Error -3 while decompressing" in _lines(summary)[rel]
    assert summary.exit_code == 3
    _assert_good_converted(summary)
    assert _fates(dst)[rel][0] == "quarantined"
    assert "Traceback" not in capsys.readouterr().err


def test_unknown_vr_in_the_series_uid_makes_the_file_unreadable(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out"
    paths = write_series(src / "bad", shape=(4, 4, 3), series_number=2)
    bad = set_unknown_vr(paths[1], tag=(0x0020, 0x000E))
    _good(src)
    summary = ingest(src, dst, progress=False)
    reason = _lines(summary)[_named(dst, bad.relative_to(src).as_posix())]
    assert "Unknown Value Representation 'ZZ'" in reason and "\n" not in reason
    assert summary.exit_code == 3
    _assert_good_converted(summary)


def test_unknown_vr_in_a_minor_tag_drops_only_that_element(tmp_path, capfd):
    src, dst = tmp_path / "src", tmp_path / "out"
    paths = write_series(src / "s", shape=(4, 4, 3), series_number=2)
    set_unknown_vr(paths[0], tag=(0x0008, 0x0060))  # Modality, read from the first file
    summary = ingest(src, dst, progress=False)
    assert summary.exit_code == 0, summary.quarantined
    assert nib.load(summary.volumes_written[0]).shape == (4, 4, 3)
    log = summary.log_path.read_text()
    name = _named(dst, "s/IM0001.dcm")
    assert f"{name}: UserWarning: dropped unreadable element (0008,0060)" in log
    assert "Unknown Value Representation" not in capfd.readouterr().err


@pytest.mark.parametrize(
    "error",
    [
        NotImplementedError("Unknown Value Representation 'QQ' in tag (0010,0010)"),
        zlib.error("Error -3 while decompressing data: invalid stored block lengths"),
        RecursionError("maximum recursion depth exceeded"),
        MemoryError(),
    ],
    ids=["unknown-vr", "zlib", "deep-nesting", "memory"],
)
@pytest.mark.parametrize("where", ["scan", "read"])
def test_any_reader_failure_on_one_file_is_its_reason(tmp_path, monkeypatch, error, where):
    """Whatever pydicom raises for one file, in the header scan or the full read."""
    import pydicom

    src, dst = tmp_path / "src", tmp_path / "out"
    bad = write_series(src / "bad", shape=(4, 4, 3), series_number=2)[1]
    _good(src)
    real = pydicom.dcmread

    def flaky(path, *args, **kwargs):
        full_read = "specific_tags" not in kwargs
        if Path(path).name == bad.name and "bad" in str(path) and full_read == (where == "read"):
            raise error
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", flaky)
    summary = ingest(src, dst, progress=False)
    rel = _named(dst, bad.relative_to(src).as_posix())
    assert list(_lines(summary)) == [rel]
    assert type(error).__name__ in _lines(summary)[rel]
    assert summary.exit_code == 3
    _assert_good_converted(summary)


def test_deeply_nested_sequences_do_not_stop_the_run(tmp_path):
    from pydicom import dcmread
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    src, dst = tmp_path / "src", tmp_path / "out"
    paths = write_series(src / "deep", shape=(4, 4, 3), series_number=2)
    ds = dcmread(paths[0])
    inner = Dataset()
    inner.CodeValue = "X"
    for _ in range(200):
        outer = Dataset()
        outer.ReferencedImageSequence = Sequence([inner])
        inner = outer
    ds.ReferencedImageSequence = Sequence([inner])
    ds.save_as(paths[0])
    _good(src)
    summary = ingest(src, dst, progress=False)
    assert summary.exit_code in (0, 3)
    _assert_good_converted(summary)


def test_file_name_that_is_not_utf8(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out"
    paths = write_series(src / "s", shape=(4, 4, 3), series_number=2)
    odd = os.fsencode(paths[1].parent) + b"/IM\xff\xfe.dcm"
    os.rename(paths[1], odd)
    summary = ingest(src, dst, progress=False)
    assert summary.exit_code == 0, summary.quarantined
    (out,) = summary.volumes_written
    assert nib.load(out).shape == (6, 4, 3) or nib.load(out).shape[2] == 3
    fates = _fates(dst)
    assert fates[_named(dst, "s/IM\\xff\\xfe.dcm")][0] == "converted"
    kept = ingest(src, tmp_path / "kept", progress=False, keep_phi=True)
    assert kept.exit_code == 0
    assert _fates(tmp_path / "kept")["s/IM\\xff\\xfe.dcm"][0] == "converted"  # bytes escaped
    again = ingest(src, dst, progress=False)  # and the fingerprint is stable
    assert again.counts["unchanged"] == 1


def test_internal_error_is_one_line_and_traceback_only_with_debug(tmp_path, monkeypatch):
    from medgen.stages import ingest as stage

    src = tmp_path / "src"
    _good(src)

    def bug(*args, **kwargs):
        raise KeyError("a bug in medgen")

    monkeypatch.setattr(stage, "_ingest", bug)
    result = runner.invoke(app, ["ingest", str(src), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [
        "medgen: internal error: KeyError: 'a bug in medgen' "
        "(a bug in medgen; rerun with --debug for the traceback)"
    ]
    debug = runner.invoke(app, ["ingest", str(src), "--out", str(tmp_path / "o2"), "--debug"])
    assert isinstance(debug.exception, KeyError)


# -- 8. every file that looks like DICOM but cannot be used is named -----------------------


def test_broken_dicom_files_are_in_the_manifest_and_the_summary(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out"
    _good(src)
    template = write_series(tmp_path / "t", shape=(4, 4, 1))[0].read_bytes()
    broken = src / "broken"
    broken.mkdir()
    for n in range(25):  # preamble and a file meta, then garbage or nothing
        (broken / f"X{n:02d}").write_bytes(template[: 132 + 20 + n] + b"\xff" * 7)
    (broken / "no_uid.dcm").write_bytes(b"")
    result = runner.invoke(app, ["ingest", str(src), "--out", str(dst), "--quiet"])
    assert result.exit_code == 3
    lines = result.output.splitlines()
    folder = _named(dst, "broken")
    shown = [line for line in lines if line.startswith(f"quarantined: {folder}/")]
    assert len(shown) == 20  # the first lines, then a count
    assert "... and 5 more quarantined" in result.output
    fates = _fates(dst)
    for n in range(25):
        fate, detail = fates[_named(dst, f"broken/X{n:02d}")]
        assert fate == "quarantined" and detail
    assert fates[_named(dst, "broken/no_uid.dcm")] == ("skipped", "empty file")
    assert "Traceback" not in result.output


def test_image_without_series_uid_is_quarantined_not_skipped(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out"
    _good(src)
    bad = write_series(src / "x", shape=(4, 4, 1))[0]
    import pydicom

    ds = pydicom.dcmread(bad)
    del ds.SeriesInstanceUID
    ds.save_as(bad)
    summary = ingest(src, dst, progress=False)
    assert _lines(summary) == {_named(dst, "x/IM0001.dcm"): "DICOM image without SeriesInstanceUID"}
    assert summary.exit_code == 3


# -- 9. library warnings go to the log, not to stderr ------------------------------------------


def test_reader_warnings_go_to_the_log_with_the_file_name(tmp_path, capfd):
    src, dst = tmp_path / "src", tmp_path / "out"
    paths = write_series(src / "s", shape=(4, 4, 3), series_number=2)
    paths[2].write_bytes(paths[2].read_bytes()[:700])  # cuts SeriesInstanceUID short
    _good(src)
    summary = ingest(src, dst, progress=False)
    err = capfd.readouterr().err
    assert "Warning" not in err and "Traceback" not in err
    log = summary.log_path.read_text()
    assert f"{_named(dst, 's/IM0003.dcm')}: UserWarning: Invalid value for VR UI" in log
    assert summary.warnings_logged >= 1
    assert summary.exit_code == 3


# -- 6. decompression bombs are refused before decoding ---------------------------------------


def test_jpeg2000_codestream_claiming_a_huge_image_is_refused(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out"
    paths = write_series(src / "bomb", shape=(32, 32, 3), series_number=2)
    jpeg2000_bomb(paths[1])
    _good(src)
    summary = ingest(src, dst, progress=False)
    reason = _lines(summary)[_named(dst, "bomb/IM0002.dcm")]
    assert "compressed frame declares 60000x60000 pixels" in reason
    assert summary.exit_code == 3
    _assert_good_converted(summary)


def test_the_limit_is_an_option(tmp_path):
    src = tmp_path / "src"
    _good(src)
    # 4x4x2 bytes per image: a limit below that refuses every image.
    summary = ingest(src, tmp_path / "out", progress=False, max_image_mb=16 / 2**20)
    assert summary.exit_code == 4
    assert "over the limit" in summary.quarantined[0][1]
    with pytest.raises(ValueError, match="`max_image_mb` must be > 0, got 0"):
        ingest(src, tmp_path / "o", progress=False, max_image_mb=0)


def test_deflate_bomb_is_refused_without_inflating_it(tmp_path, monkeypatch):
    import pydicom.filereader

    src, dst = tmp_path / "src", tmp_path / "out"
    paths = write_series(src / "bomb", shape=(4, 4, 3), series_number=2)
    deflate_bomb(paths[2], expands_to_mb=40)
    _good(src)

    def inflate_all(*args, **kwargs):
        raise AssertionError("pydicom inflated the whole bomb")

    monkeypatch.setattr(pydicom.filereader.zlib, "decompress", inflate_all)
    summary = ingest(src, dst, progress=False, max_image_mb=8)
    reason = _lines(summary)[_named(dst, "bomb/IM0003.dcm")]
    assert "deflated data expands past 24 MB, over the limit of 8 MB" in reason
    # Its first bytes name its series: that series is refused, never one slice short.
    assert "a slice would be missing" in reason
    assert summary.exit_code == 3 and summary.counts["converted"] == 1
    _assert_good_converted(summary)


# Peak memory is the child's own high-water mark (VmHWM): ru_maxrss would carry over the
# high-water mark of the pytest process that started it (Linux keeps it across exec).
_PEAK_SCRIPT = """
import sys
from medgen.stages.ingest import ingest
s = ingest(sys.argv[1], sys.argv[2], progress=False, max_image_mb=float(sys.argv[3]))
print(s.exit_code, int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM'))))
"""


def _ingest_peak_kb(src: Path, dst: Path, max_image_mb: float) -> tuple[int, int]:
    """(exit code, peak resident memory in kB) of ``ingest`` in a fresh process."""
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(src), str(dst), str(max_image_mb)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    code, peak_kb = (int(v) for v in proc.stdout.split())
    return code, peak_kb


def test_deflate_bomb_keeps_peak_memory_bounded(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out"
    deflate_bomb(write_series(src / "bomb", shape=(4, 4, 1), series_number=2)[0], 400)
    _good(src)
    code, peak_kb = _ingest_peak_kb(src, dst, 16)
    assert code == 3
    assert peak_kb < 300 * 1024, f"peak memory {peak_kb / 1024:.0f} MB for a 400 MB bomb"


def test_bombs_keep_peak_memory_bounded(tmp_path):
    from medgen.io.dicom_limits import DEFAULT_MAX_IMAGE_MB

    src, dst = tmp_path / "src", tmp_path / "out"
    jpeg2000_bomb(write_series(src / "j2k", shape=(32, 32, 3), series_number=2)[0])
    write_series(src / "hdr", shape=(8, 8, 3), series_number=3,
                 extra={"Rows": 60000, "Columns": 60000})
    _good(src)
    code, peak_kb = _ingest_peak_kb(src, dst, DEFAULT_MAX_IMAGE_MB)
    assert code == 3
    assert peak_kb < 1024 * 1024, f"peak memory {peak_kb / 1024:.0f} MB"


# -- 1. classic 4D without temporal tags -------------------------------------------------------


@pytest.mark.parametrize("order", ["volume-major", "slice-major"])
def test_classic_4d_without_temporal_tags_is_ordered_by_instance_number(tmp_path, order):
    n_pos, n_vol = 3, 4
    files = []  # file k holds pattern slice k; position and time of file k:
    for k in range(n_pos * n_vol):
        t, z = divmod(k, n_pos) if order == "volume-major" else (k % n_vol, k // n_vol)
        files.append((z, t))
    positions = [(0.0, 0.0, 3.0 * z) for z, _ in files]
    src, dst = tmp_path / "src", tmp_path / "out"
    write_series(src / "epi", shape=(4, 5, n_pos * n_vol), positions=positions,
                 modality="MR", rescale=None, extra={"RepetitionTime": 2000.0},
                 shuffle_instances=False)
    _good(src)
    summary = ingest(src, dst, progress=False)
    assert summary.exit_code == 0, summary.quarantined
    (out,) = [p for p in summary.volumes_written if _is_series(p.name, 1)]
    img = nib.load(out)
    assert img.shape == (5, 4, n_pos, n_vol)
    assert img.header.get_zooms()[3] == pytest.approx(2.0)  # TR in seconds
    data = np.asarray(img.dataobj)
    pattern = voxel_pattern(4, 5, n_pos * n_vol)
    for k, (z, t) in enumerate(files):
        np.testing.assert_array_equal(data[:, :, z, t], pattern[:, :, k].T)
    sidecar = json.loads(out.with_name(out.name.replace(".nii.gz", ".json")).read_text())
    assert any("ordered by InstanceNumber" in p for p in sidecar["Provenance"])


# -- 2, 3. a one-image series and uneven spacing through ingest -------------------------------


def test_one_image_series_becomes_a_2d_volume(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out"
    write_series(src / "loc", shape=(6, 5, 1), spacing=(0.8, 0.7, 5.0), series_number=4)
    summary = ingest(src, dst, progress=False)
    assert summary.exit_code == 0 and summary.quarantined == []
    (out,) = summary.volumes_written
    assert nib.load(out).shape == (5, 6, 1)
    assert nib.load(out).header.get_zooms()[2] == pytest.approx(5.0)
    sidecar = json.loads(out.with_name(out.name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["ImageDimensions"] == 2
    # Stages that need 3D (train, enhance) refuse it in one line naming the file.
    from medgen.errors import InputError
    from medgen.stages.common import load_volume, require_3d

    with pytest.raises(InputError, match=r"is a 2D image \(5x6x1 voxels\); this stage needs a 3D"):
        require_3d(load_volume(out), out)
    three_d = _good(tmp_path / "g")
    assert require_3d(load_volume(three_d[0].parent), "g").shape == (4, 4, 3)


def test_uneven_spacing_is_resampled_and_said_in_the_sidecar(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out"
    zs = [0.0, 1.08, 2.16, 3.24, 10.24, 17.24]  # variable table increment: 1.08 then 7 mm
    write_series(src / "ct", shape=(4, 4, 6), positions=[(0.0, 0.0, z) for z in zs])
    summary = ingest(src, dst, progress=False)
    assert summary.exit_code == 0, summary.quarantined
    (out,) = summary.volumes_written
    img = nib.load(out)
    assert img.shape[2] == round(17.24 / 1.08) + 1
    np.testing.assert_allclose(img.header.get_zooms()[2], 17.24 / (img.shape[2] - 1), rtol=1e-5)
    sidecar = json.loads(out.with_name(out.name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["SliceSpacingResampled"] is True
    assert any("uneven slice spacing (1.08 to 7 mm) resampled" in p for p in sidecar["Provenance"])


# -- 4. symbolic links -------------------------------------------------------------------------


def test_symlinked_files_are_followed_and_loops_guarded(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out"
    objects = src / ".git" / "annex" / "objects"  # hidden: reached only through the links
    paths = write_series(objects, shape=(4, 4, 3), series_number=5)
    (src / "sub" / "anat").mkdir(parents=True)
    for path in paths:
        (src / "sub" / "anat" / path.name).symlink_to(path)
    (src / "sub" / "loop").symlink_to(src)  # a link back up the tree
    (src / "sub" / "dangling").symlink_to(tmp_path / "gone")
    summary = ingest(src, dst, progress=False)
    assert summary.exit_code == 0, summary.quarantined
    (out,) = summary.volumes_written
    assert nib.load(out).shape == (4, 4, 3)
    fates = _fates(dst)
    assert {p for p, (f, _) in fates.items() if f == "converted"} == {
        _named(dst, f"sub/anat/{p.name}") for p in paths
    }
    assert fates[_named(dst, "sub/dangling")] == ("skipped", "broken symbolic link")


# -- 11. workers die with their parent ---------------------------------------------------------

_KILL_SCRIPT = """
import multiprocessing, os, signal, sys, threading, time
from pathlib import Path
from medgen.stages.ingest_plan import plan_ingest
from medgen.stages.ingest_run import run_tasks
from tests.slow_convert import sleepy

plan = plan_ingest(Path(sys.argv[1]), Path(sys.argv[2]))
threading.Thread(target=lambda: list(run_tasks(plan.tasks, 2, sleepy)), daemon=True).start()
deadline = time.time() + 30
while len(multiprocessing.active_children()) < 2 and time.time() < deadline:
    time.sleep(0.1)
time.sleep(1.0)
print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return "\\nState:\\tZ" not in fh.read()  # a zombie is dead, waiting to be reaped
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux only)")
def test_killing_the_parent_leaves_no_workers_and_no_open_stdout(tmp_path):
    import time

    src, dst = tmp_path / "src", tmp_path / "out"
    for n in (1, 2, 3):
        write_series(src / f"s{n}", shape=(4, 4, 2), series_number=n)
    dst.mkdir()
    # capture_output waits for stdout to close: a worker holding it would hang this call.
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, str(src), str(dst)],
        capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    assert proc.returncode == -9, proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) >= 2
    deadline = time.time() + 10
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids if _alive(p)]
