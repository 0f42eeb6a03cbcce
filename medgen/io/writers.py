"""One entry point for writing a volume: the format follows the path (or ``format=``)."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, get_args

from medgen.volume import Volume

__all__ = ["OutputFormat", "format_for_path", "save"]

OutputFormat = Literal["nifti", "nrrd", "mha", "png", "dicom"]
_SUFFIX_FORMAT: dict[str, OutputFormat] = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".mha": "mha",
    ".mhd": "mha",
    ".png": "png",
}


def _check_format(value: str) -> OutputFormat:
    choices = get_args(OutputFormat)
    if value in choices:
        return value  # type: ignore[return-value]
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"`format` must be one of {', '.join(choices)}, got {value!r}{hint}")


def format_for_path(path: str | Path) -> OutputFormat:
    """The output format implied by a file name's suffix.

    Examples
    --------
    >>> format_for_path("out/ct.nii.gz"), format_for_path("a.MHA"), format_for_path("p.png")
    ('nifti', 'mha', 'png')
    """
    name = Path(path).name.lower()
    for suffix, fmt in _SUFFIX_FORMAT.items():
        if name.endswith(suffix):
            return fmt
    suffix = "".join(Path(name).suffixes) or "(none)"
    close = difflib.get_close_matches(suffix, list(_SUFFIX_FORMAT), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"cannot tell the output format from suffix {suffix!r} of {Path(path).name!r}: use one"
        f" of {', '.join(_SUFFIX_FORMAT)}, or a folder with format='dicom'{hint}"
    )


def save(
    volume: Volume,
    path: str | Path,
    *,
    format: OutputFormat | None = None,  # noqa: A002 - the user-facing option name
    sidecar: bool = False,
    keep_phi: bool = False,
    **kwargs: Any,
) -> Path:
    """Write ``volume`` to ``path`` and return the path written.

    Parameters
    ----------
    volume : Volume
    path : str or Path
        ``.nii``/``.nii.gz`` -> NIfTI, ``.nrrd``/``.nhdr``/``.mha``/``.mhd`` -> ITK formats,
        ``.png`` -> a three-view montage, or a folder with ``format="dicom"`` -> a DICOM
        series (one file per slice).
    format : {"nifti", "nrrd", "mha", "png", "dicom"}, optional
        Overrides the suffix; required for DICOM.
    sidecar : bool
        NIfTI/ITK only: also write a de-identified JSON sidecar (``<stem>.json``).
    keep_phi : bool
        Keep patient identifiers in the sidecar / DICOM output.
    **kwargs
        Passed to the format's writer: ``compresslevel`` (NIfTI), ``compress`` (ITK),
        ``window`` (PNG), the options of :func:`~medgen.io.dicom_writer.write_dicom_series`.
    """
    path = Path(path)
    fmt = _check_format(format) if format is not None else format_for_path(path)
    if sidecar and fmt in ("dicom", "png"):
        raise ValueError(f"`sidecar` applies to NIfTI, NRRD and MHA outputs, not {fmt}")
    if fmt == "dicom":
        from medgen.io.dicom_writer import write_dicom_series

        write_dicom_series(volume, path, keep_phi=keep_phi, **kwargs)
        return path
    if fmt == "png":
        from medgen.io.montage import save_montage

        return save_montage(volume, path, **kwargs)
    if fmt == "nifti":
        from medgen.io.nifti import write_nifti

        write_nifti(volume, path, **kwargs)
    else:
        from medgen.io.itk import write_itk

        write_itk(volume, path, **kwargs)
    if sidecar:
        from medgen.io.sidecar import sidecar_path, write_sidecar

        write_sidecar(volume, sidecar_path(path), keep_phi=keep_phi)
    return path
