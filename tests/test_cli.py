"""The ``medgen`` command line: ingest, exit codes, messages, import weight."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medgen.cli import app
from medgen.stages.ingest_names import SourceNames
from tests.dicom_factory import write_series

MEDGEN = Path(sys.executable).with_name("medgen")
runner = CliRunner()


def _env() -> dict[str, str]:
    return {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "COLUMNS": "200"}


@pytest.fixture()
def good_src(tmp_path):
    src = tmp_path / "src"
    write_series(src / "ct", shape=(6, 5, 4), series_number=2)
    (src / "notes.txt").write_text("not an image")
    return src


def test_help_documents_exit_codes():
    for args in (["--help"], ["ingest", "--help"]):
        result = runner.invoke(app, args, env={"COLUMNS": "200"})
        assert result.exit_code == 0
        text = " ".join(result.output.split())
        for words in (
            "0 every image series converted",
            "2 a usage error",
            "3 some files",
            "4 nothing usable",
        ):
            assert words in text, (args, words)


def test_ingest_exit_0_prints_summary_table(good_src, tmp_path):
    result = runner.invoke(
        app, ["ingest", str(good_src), "--out", str(tmp_path / "out")], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "volumes written" in result.output and "not DICOM (text)" in result.output
    assert len(list((tmp_path / "out").glob("*.nii.gz"))) == 1
    again = runner.invoke(
        app, ["ingest", str(good_src), "-o", str(tmp_path / "out")], env={"COLUMNS": "200"}
    )
    assert again.exit_code == 0
    assert "1 (1 volumes)" in again.output  # series unchanged


def test_ingest_exit_3_lists_each_bad_file_on_one_line(good_src, tmp_path):
    lone = write_series(good_src / "lone", shape=(6, 5, 3), series_number=7, same_position=True)
    trunc = write_series(good_src / "trunc", shape=(6, 5, 4), series_number=8, truncate=[3])
    result = runner.invoke(
        app, ["ingest", str(good_src), "--out", str(tmp_path / "out"), "--quiet"]
    )
    assert result.exit_code == 3
    lines = [line for line in result.output.splitlines() if line.startswith("quarantined: ")]
    assert len(lines) == 2
    named = SourceNames.for_output(tmp_path / "out").path  # pseudonyms: no PHI in names
    assert lines[0].startswith(f"quarantined: {named(lone[0].relative_to(good_src).as_posix())}: ")
    assert lines[1].startswith(f"quarantined: {named(trunc[3].relative_to(good_src).as_posix())}: ")
    assert "volumes written" not in result.output  # --quiet: no table


def test_ingest_exit_4_when_nothing_usable(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("text")
    result = runner.invoke(app, ["ingest", str(src), "--out", str(tmp_path / "out")])
    assert result.exit_code == 4
    assert "nothing usable found" in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["ingest"],
        ["ingest", "{src}"],
        ["ingest", "{missing}", "--out", "{out}"],
        ["ingest", "{src}", "-o", "{out}", "--workers", "0"],
        ["nonsense"],
    ],
    ids=["no-src", "no-out", "missing-src", "zero-workers", "unknown-command"],
)
def test_usage_errors_exit_2(tmp_path, args):
    (tmp_path / "src").mkdir()
    names = {"src": tmp_path / "src", "missing": tmp_path / "missing", "out": tmp_path / "out"}
    result = runner.invoke(app, [a.format(**names) for a in args])
    assert result.exit_code == 2


def test_console_script_converts_and_reports_without_traceback(good_src, tmp_path):
    if not MEDGEN.exists():
        pytest.skip(f"console script not installed at {MEDGEN}")
    bad = write_series(good_src / "lone", shape=(6, 5, 3), series_number=7, same_position=True)
    proc = subprocess.run(
        [str(MEDGEN), "ingest", str(good_src), "--out", str(tmp_path / "out"), "--workers", "2"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    named = SourceNames.for_output(tmp_path / "out").path(bad[0].relative_to(good_src).as_posix())
    assert f"quarantined: {named}: " in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "volumes written" in proc.stdout
    assert len(list((tmp_path / "out").glob("*.nii.gz"))) == 1


def test_console_script_reports_bad_folder_in_one_line(good_src):
    if not MEDGEN.exists():
        pytest.skip(f"console script not installed at {MEDGEN}")
    proc = subprocess.run(
        [str(MEDGEN), "ingest", str(good_src), "--out", str(good_src)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"medgen: error: {good_src}: the output folder must differ from the input folder"
    ]


def test_help_and_ingest_do_not_import_torch_or_monai(good_src, tmp_path):
    code = (
        "import sys\n"
        "from medgen.cli import main\n"
        "for argv in (['--help'], ['ingest', sys.argv[1], '--out', sys.argv[2], '-q']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code in (0, None), exc.code\n"
        "heavy = sorted(m for m in ('torch', 'monai', 'mlflow') if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(good_src), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY="
    assert len(list((tmp_path / "out").glob("*.nii.gz"))) == 1  # ingest really ran


def test_python_dash_m_medgen_runs_the_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "medgen", "--version"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("medgen ")
