"""What a batch calls a study: every series of one StudyInstanceUID, wherever its files lie.

``medgen ingest`` groups DICOM files by SeriesInstanceUID (:mod:`medgen.stages.ingest_plan`);
a batch runs per study, so its series are grouped once more, by StudyInstanceUID: a study
whose series lie in several folders is one study, and a folder holding two studies gives
two. The study key is a keyed hash of the StudyInstanceUID under the output folder's secret
(like series keys), so the UID itself never reaches an output. A series without a
StudyInstanceUID is a study of its own (keyed as its series); NIfTI and other one-file
images are one study per file, as in ingest.

A synthesis pipeline reads no archive: its "studies" are the samples to make
(:func:`synthetic_studies`), one per condition and index.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from medgen.archive.manifest import FileRecord
from medgen.stages.ingest_plan import SeriesTask


@dataclass(frozen=True)
class SyntheticSample:
    """Sample ``index`` under ``condition`` (its noise comes from the pipeline's seed and ``index``)."""

    condition: dict
    index: int


@dataclass(frozen=True)
class ArchiveStudy:
    """One study of the archive: its pseudonymous key and its series, in archive order (or,
    of a synthesis pipeline, the sample to make)."""

    key: str
    kind: str
    series: tuple[SeriesTask, ...]
    fingerprint: str
    sample: SyntheticSample | None = None

    @property
    def n_files(self) -> int:
        return sum(len(s.files) for s in self.series)


@dataclass(frozen=True)
class ArchiveScan:
    """The manifest's file records and the studies found."""

    records: tuple[FileRecord, ...]
    studies: tuple[ArchiveStudy, ...]


def scan_archive(src: Path, out: Path, *, keep_phi: bool = False, max_image_mb: float = 2048.0) -> ArchiveScan:
    """Scan ``src`` as ingest does (files under ``out`` left out) and group its series into
    studies (see the module doc)."""
    from medgen.io.discover import scan_tree
    from medgen.stages.ingest_names import SourceNames
    from medgen.stages.ingest_plan import is_within, plan_from_entries, relative_posix

    entries = [e for e in scan_tree(src, max_image_mb=max_image_mb)
               if not is_within(Path(os.path.realpath(e.path)), out)]
    names = SourceNames.for_output(out, keep_phi=keep_phi)
    plan = plan_from_entries(entries, src, out, keep_phi=keep_phi, max_image_mb=max_image_mb, names=names)
    # The plan names each file (as the manifest does) with its series; the scan knows its study.
    series_of = {r.path: r.series_key for r in plan.records if r.series_key}
    uids: dict[str, Counter] = {}
    for e in entries:
        study_uid = getattr(e, "study_uid", None)
        if e.kind == "dicom" and study_uid:
            series_key = series_of.get(names.path(relative_posix(os.path.abspath(e.path), src)))
            if series_key is not None:
                uids.setdefault(series_key, Counter())[study_uid] += 1
    study_uid_of = {key: counts.most_common(1)[0][0] for key, counts in uids.items()}
    return ArchiveScan(plan.records, group_series(plan.tasks, study_uid_of, names.secret))


def group_series(tasks: tuple[SeriesTask, ...] | list[SeriesTask], study_uid_of: dict[str, str],
                 secret: str) -> tuple[ArchiveStudy, ...]:
    """Series grouped into studies by ``study_uid_of`` (series key -> StudyInstanceUID), in
    the order of each study's first series.

    Examples
    --------
    >>> from medgen.stages.ingest_plan import SeriesTask
    >>> def series(key):
    ...     return SeriesTask(key, "dicom", (f"/a/{key}",), (key,), "fp-" + key, "/a", "/o", False)
    >>> studies = group_series([series("s1"), series("s2"), series("s3")], {"s1": "1.2", "s3": "1.2"}, "k")
    >>> [[s.key for s in st.series] for st in studies]
    [['s1', 's3'], ['s2']]
    >>> studies[1].key
    's2'
    """
    from medgen.io.deid import pseudonym

    groups: dict[str, list[SeriesTask]] = {}
    for task in tasks:
        uid = study_uid_of.get(task.key) if task.kind == "dicom" else None
        key = pseudonym("study", uid, salt=secret) if uid else task.key
        groups.setdefault(key, []).append(task)
    return tuple(ArchiveStudy(key, series[0].kind, tuple(series), _fingerprint(series))
                 for key, series in groups.items())


def synthetic_studies(pipeline) -> tuple[ArchiveStudy, ...]:
    """The samples a synthesis pipeline makes, condition by condition.

    Examples
    --------
    >>> from medgen.batch.spec import BatchPipeline
    >>> p = BatchPipeline.model_validate({"name": "s", "stages": [{"synthesize": {
    ...     "model": "m.pt", "n_per_condition": 2, "conditions": [{"label": 1, "age_years": 70}]}}]})
    >>> [s.key for s in synthetic_studies(p)]
    ['synthetic-age_years70_label1-00000', 'synthetic-age_years70_label1-00001']
    """
    from medgen.io.deid import safe_name

    settings = pipeline.settings("synthesize")
    labels = [safe_name("_".join(f"{k}{v}" for k, v in sorted(c.items())), max_len=40, empty="unconditional")
              for c in settings.conditions]
    studies = []
    for condition, label in zip(settings.conditions, labels, strict=True):
        if labels.count(label) > 1:  # two conditions that read alike once made file-safe
            label += "-" + hashlib.sha256(json.dumps(condition, sort_keys=True).encode()).hexdigest()[:6]
        for index in range(settings.n_per_condition):
            sample = SyntheticSample(dict(condition), index)
            text = json.dumps({"condition": condition, "index": index}, sort_keys=True)
            studies.append(ArchiveStudy(f"synthetic-{label}-{index:05d}", "synthetic", (),
                                        hashlib.sha256(text.encode()).hexdigest()[:32], sample))
    return tuple(studies)


def _fingerprint(series: list[SeriesTask]) -> str:
    """A one-series study keeps its series' fingerprint; a study of several hashes theirs."""
    if len(series) == 1:
        return series[0].fingerprint
    text = "|".join(sorted(f"{s.key}={s.fingerprint}" for s in series))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


__all__ = ["ArchiveScan", "ArchiveStudy", "SyntheticSample", "group_series", "scan_archive", "synthetic_studies"]
