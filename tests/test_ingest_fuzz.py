"""A seeded fuzz corpus through ``medgen ingest`` (issue 9, "Measured").

Good synthetic series (four transfer syntaxes) are broken by header and byte mutations —
truncation, flipped bytes, an invalid VR code, a wrong length, a wrong transfer syntax —
and each broken series lies next to a good one. Whatever the damage, the run must not
abort: no traceback, exit status 0 or 3, every good series converted, every broken file
that still looks like DICOM named with a reason (manifest and summary), inputs
unchanged, peak memory bounded.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from medgen.archive import Manifest
from medgen.stages.ingest_names import SourceNames
from tests.dicom_factory import write_series

N_CASES = 36
MUTATIONS = ("truncate", "flip", "bad_vr", "bad_length", "wrong_ts")
SYNTAXES = (
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian
    "1.2.840.10008.1.2.5",  # RLE lossless
)
WRONG_SYNTAXES = (
    b"1.2.840.10008.1.2", b"1.2.840.10008.1.2.2", b"1.2.840.10008.1.2.1.99",
    b"1.2.840.10008.1.2.4.90", b"1.2.840.10008.1.2.5", b"1.2.840.10008.1.2.4.50", b"1.2.3.4",
)
_VRS = (b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OW PN SH SL SQ SS ST TM UC UI UL "
        b"UN UR US UT").split()
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"}

_RUN = """
import resource, sys
from medgen.cli import main
try:
    main(sys.argv[2:])
finally:
    peak = int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))
    peak = max(peak, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    open(sys.argv[1], "w").write(str(peak))
"""


def _element_offsets(data: bytes) -> list[int]:
    """Offsets of explicit-VR element headers (a tag, then a known VR code) past the preamble."""
    return [
        at for at in range(132, len(data) - 8)
        if data[at + 4 : at + 6] in _VRS and (data[at + 1] == 0 or data[at : at + 2] == b"\xe0\x7f")
    ]


def mutate(data: bytes, kind: str, rng: random.Random) -> bytes:
    """One mutation of a DICOM file's bytes (deterministic for a given ``rng`` state)."""
    buf = bytearray(data)
    if kind == "truncate":  # half of the cuts inside the header, where the UIDs are
        end = len(buf) if rng.random() < 0.5 else min(len(buf), 1200)
        return bytes(buf[: rng.randrange(0, end)])
    if kind == "flip":
        header_end = min(len(buf), data.find(b"\xe0\x7f\x10\x00") % len(buf) or len(buf))
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(0, header_end if rng.random() < 0.8 else len(buf))
            buf[at] ^= rng.randrange(1, 256)
        return bytes(buf)
    offsets = _element_offsets(data)
    if kind in ("bad_vr", "bad_length") and offsets:
        at = rng.choice(offsets)
        if kind == "bad_vr":
            buf[at + 4 : at + 6] = bytes(rng.choice(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in "ab")
            return bytes(buf)
        if bytes(buf[at + 4 : at + 6]) in _LONG_VRS:
            value = rng.choice([0xFFFFFFFF, 0x7FFFFFFF, rng.randrange(0, 1 << 32)])
            buf[at + 8 : at + 12] = struct.pack("<I", value)
        else:
            buf[at + 6 : at + 8] = struct.pack("<H", rng.choice([0, 1, 0xFFFF, rng.randrange(0, 1 << 16)]))
        return bytes(buf)
    # wrong transfer syntax (also the fallback when no explicit-VR element was found)
    return _relabel(data, rng.choice(WRONG_SYNTAXES))


def _relabel(data: bytes, new_uid: bytes) -> bytes:
    at = data.find(b"\x02\x00\x10\x00UI")  # (0002,0010) TransferSyntaxUID
    if at < 0:
        return data
    old_len = struct.unpack("<H", data[at + 6 : at + 8])[0]
    new = new_uid + b"\x00" * (len(new_uid) % 2)
    out = data[: at + 6] + struct.pack("<H", len(new)) + new + data[at + 8 + old_len :]
    group_at = out.find(b"\x02\x00\x00\x00UL")
    if group_at >= 0:
        length = struct.unpack("<I", out[group_at + 8 : group_at + 12])[0] + len(new) - old_len
        out = out[: group_at + 8] + struct.pack("<I", length) + out[group_at + 12 :]
    return out


def looks_like_dicom(data: bytes) -> bool:
    """What ingest treats as DICOM-looking (``medgen.io.discover``)."""
    return (len(data) >= 132 and data[128:132] == b"DICM") or data[:2] in (
        b"\x08\x00", b"\x02\x00", b"\x00\x08"
    )


def build_corpus(src: Path, seed: int, n_cases: int = N_CASES):
    """``n_cases`` folders, each a good series and a broken one; returns (good, broken)."""
    rng = random.Random(seed)
    good: list[Path] = []
    broken: dict[Path, str] = {}
    for case in range(n_cases):
        syntax = SYNTAXES[case % len(SYNTAXES)]
        here = src / f"case{case:03d}"
        good += write_series(here / "good", shape=(6, 5, 3), series_number=1,
                             transfer_syntax=syntax)
        # Every other case puts the broken series in the good series' own folder.
        bad = write_series(here / ("good" if case % 2 else "bad"), shape=(6, 5, rng.choice([1, 3])),
                           series_number=2, name_pattern="B{index:04d}",
                           transfer_syntax=SYNTAXES[rng.randrange(len(SYNTAXES))])
        for path in rng.sample(bad, rng.randint(1, len(bad))):
            kind = rng.choice(MUTATIONS)
            path.write_bytes(mutate(path.read_bytes(), kind, rng))
            broken[path] = kind
    return good, broken


def _checksums(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("seed", [9, 2026])
def test_fuzz_corpus_never_aborts_and_names_every_broken_file(tmp_path, seed):
    src, dst = tmp_path / "src", tmp_path / "out"
    good, broken = build_corpus(src, seed)
    before = _checksums(src)
    peak_file = tmp_path / "peak_kb"
    proc = subprocess.run(
        [sys.executable, "-c", _RUN, str(peak_file), "ingest", str(src), "-o", str(dst),
         "--workers", "2", "--max-lines", "100000", "--max-image-mb", "256"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "COLUMNS": "300"},
        cwd=Path(__file__).resolve().parents[1],
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode in (0, 3), out[-3000:]
    assert "Traceback" not in out and not re.search(r"\w+Warning\b", proc.stderr), out[-3000:]
    assert int(peak_file.read_text()) < 1024 * 1024, "peak memory over 1 GB"
    assert _checksums(src) == before  # inputs are read-only

    named = SourceNames.for_output(dst).path
    with Manifest.open(dst) as manifest:
        fates = {f.path: (f.fate, f.detail) for f in manifest.files()}
        series_of = {f.path: f.series_key for f in manifest.files()}
        anchor = {s.series_key: s.problem_path for s in manifest.all_series()}
    rel = lambda p: named(p.relative_to(src).as_posix())  # noqa: E731
    not_converted = [p for p in good if fates[rel(p)][0] != "converted"]
    assert not not_converted, [(p, fates[rel(p)]) for p in not_converted][:5]
    lines = {line.split(": ", 2)[1] for line in proc.stderr.splitlines()
             if line.startswith("quarantined: ")}
    silent = []
    for path, kind in broken.items():
        fate, detail = fates[rel(path)]
        if not looks_like_dicom(path.read_bytes()):
            assert fate in ("skipped", "quarantined", "converted") and detail
            continue
        if fate == "converted":
            continue  # the damage hit a value that does not matter (or pixels)
        shown = rel(path) in lines or anchor.get(series_of[rel(path)]) in lines  # own or series line
        if fate != "quarantined" or not detail or not shown:
            silent.append((path.relative_to(src).as_posix(), kind, fate, detail))
    assert not silent, f"{len(silent)} broken files without a line: {silent[:5]}"
