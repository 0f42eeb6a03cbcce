"""How ingest names source files and series: pseudonyms by default, real paths on request.

Folder and file names in real archives carry patient names, IDs and dates
(``Doe^Jane/PHI12345_19700101/IM1``). In the default, de-identified mode every place that
would show a source path — quarantine lines, the progress bar, the terminal summary, the
manifest, ``ingest.log`` and the sidecars' ``SourceFiles`` — shows instead its
pseudonymous path (a keyed hash per component, :func:`medgen.io.deid.pseudonymous_path`),
and reasons and warnings pass through :func:`medgen.io.deid.scrub_text`. The key is the
output folder's secret (``DST/pseudonym.key``); :func:`locate` maps a pseudonym back to
the real file, given the source folder and that key. With ``keep_phi`` the real relative
paths are used everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from medgen.errors import InputError
from medgen.io.deid import pseudonym, pseudonymous_path, scrub_text

__all__ = ["SourceNames", "locate"]


@dataclass(frozen=True)
class SourceNames:
    """Names for one output folder: ``secret`` keys every pseudonym (picklable).

    Examples
    --------
    >>> names = SourceNames("k" * 64)
    >>> names.path("Doe^Jane/IM1.dcm").endswith(".dcm"), "Doe" in names.path("Doe^Jane/IM1.dcm")
    (True, False)
    >>> SourceNames("k" * 64, keep_phi=True).path("Doe^Jane/IM1.dcm")
    'Doe^Jane/IM1.dcm'
    """

    secret: str
    keep_phi: bool = False

    @classmethod
    def for_output(cls, dst: str | Path, *, keep_phi: bool = False) -> SourceNames:
        """The names of output folder ``dst``, making its key on first use.

        Raises :class:`InputError` when ``dst`` already holds converted series but no key
        (removed, or made by an older medgen): new keys would duplicate every output.
        """
        from medgen.archive.manifest import MANIFEST_NAME
        from medgen.archive.secret import KEY_NAME, folder_secret

        dst = Path(dst)
        try:
            secret = folder_secret(dst, create=False)
            if secret is None:
                if (dst / MANIFEST_NAME).exists() and _has_series(dst / MANIFEST_NAME):
                    raise InputError(
                        dst / KEY_NAME,
                        "missing, but this folder holds converted series: restore the key, "
                        "or convert into a new output folder",
                    )
                secret = folder_secret(dst, create=True)
        except ValueError as exc:
            raise InputError(dst / KEY_NAME, str(exc).split(": ", 1)[-1]) from None
        return cls(str(secret), bool(keep_phi))

    def path(self, rel: str) -> str:
        """How a file (``rel``: relative to SRC, POSIX) is named in messages and records."""
        return rel if self.keep_phi else pseudonymous_path(rel, self.secret)

    def text(self, text: str) -> str:
        """A reason or warning as it may be shown and stored."""
        return text if self.keep_phi else scrub_text(text)

    def series_key(self, series_uid: str) -> str:
        """The pseudonymous key of a DICOM series (names its outputs)."""
        return pseudonym(series_uid, salt=self.secret)

    def file_key(self, rel: str) -> str:
        """The key of a one-file image (NIfTI, NRRD ...) from its real place under SRC."""
        return pseudonym("file", rel, salt=self.secret)


def _has_series(manifest_path: Path) -> bool:
    import sqlite3

    try:
        with sqlite3.connect(f"file:{manifest_path}?mode=ro", uri=True) as db:
            return db.execute("SELECT 1 FROM series LIMIT 1").fetchone() is not None
    except sqlite3.Error:
        return False


def locate(src: str | Path, dst: str | Path, queries: Iterable[str]) -> dict[str, list[str]]:
    """Real paths (relative to ``src``) of the files that pseudonyms in ``dst`` stand for.

    A query is a pseudonymous path as shown in a message or the manifest, its last
    components (a sidecar's ``SourceFiles`` entry), or a series key (an output name's
    first part), which stands for every file of that series. Only names are read:
    ``src`` is walked as ingest walks it, no file is opened.

    Returns
    -------
    dict
        Each query -> the matching real paths, sorted (empty when none matches).
    """
    from medgen.archive.manifest import MANIFEST_NAME, Manifest
    from medgen.archive.secret import KEY_NAME, folder_secret
    from medgen.io.discover import walk_files
    from medgen.stages.ingest_plan import is_within, relative_posix

    src_path, dst_path = Path(os.path.realpath(src)), Path(os.path.realpath(dst))
    secret = folder_secret(dst_path, create=False) if dst_path.is_dir() else None
    if secret is None:
        raise InputError(dst_path / KEY_NAME, "no pseudonym key here: not an ingest output folder")
    names = SourceNames(secret)
    wanted = {q: {q.strip("/")} for q in queries}
    if (dst_path / MANIFEST_NAME).exists():
        with Manifest.open(dst_path) as manifest:
            for query, forms in wanted.items():
                forms.update(f.path for f in manifest.files(series_key=query))
    found: dict[str, list[str]] = {q: [] for q in wanted}
    for path in walk_files(src_path):
        link = os.path.abspath(path)
        if is_within(Path(os.path.realpath(link)), dst_path) or is_within(Path(link), dst_path):
            continue
        rel = relative_posix(link, src_path)
        pseudo = names.path(rel)
        for query, forms in wanted.items():
            if any(pseudo == f or pseudo.endswith("/" + f) for f in forms):
                found[query].append(rel)
    return {q: sorted(v) for q, v in found.items()}
