"""Book-keeping of what was ingested: the SQLite manifest of files, series and outputs."""

from medgen.archive.manifest import MANIFEST_NAME, FileRecord, Manifest, SeriesState, fingerprint

__all__ = ["MANIFEST_NAME", "FileRecord", "Manifest", "SeriesState", "fingerprint"]
