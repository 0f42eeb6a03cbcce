"""Refuse decompression bombs before decoding: the decoded size an image *declares*.

A 73 KB JPEG 2000 file may claim 60000 x 60000 pixels; decoders allocate what the
codestream says before finding out the data is not there. pydicom checks neither the
header's size nor the codestream's against a budget, so this module reads both:
Rows x Columns x frames x samples x bytes from the DICOM header, and the image size
in each compressed frame's own header (JPEG 2000 SIZ marker, JPEG/JPEG-LS SOF marker).
Only a few hundred bytes of each fragment are looked at.

The deflated transfer syntax is a bomb of its own kind: pydicom inflates the whole dataset
in memory before reading a single tag, so a few KB can expand to gigabytes.
:func:`check_deflated_size` inflates such a file in chunks, keeping nothing, and stops as
soon as the output passes the same limit.
"""

from __future__ import annotations

import struct
from typing import Any

__all__ = [
    "DEFAULT_MAX_IMAGE_MB",
    "check_declared_size",
    "check_deflated_size",
    "codestream_size",
    "declared_bytes",
]

#: Largest decoded image (rows x columns x frames x samples x bytes) read by default, MB.
DEFAULT_MAX_IMAGE_MB = 2048.0

_ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000) little endian: an item of encapsulated pixel data
_SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}  # JPEG SOFn, JPEG-LS SOF55
_HEAD_BYTES = 4096
_DEFLATED_UID = b"1.2.840.10008.1.2.1.99"
_META_BYTES = 8192  # the file meta group, where the transfer syntax is, fits in this
#: Inflated bytes allowed beyond the image limit, for the header around the pixel data.
DEFLATE_HEADER_ALLOWANCE = 16 * 2**20


def declared_bytes(ds: Any) -> int:
    """Decoded size in bytes that the DICOM header declares (all frames, all samples).

    Examples
    --------
    >>> from pydicom.dataset import Dataset
    >>> ds = Dataset(); ds.Rows = 512; ds.Columns = 512; ds.BitsAllocated = 16
    >>> declared_bytes(ds)
    524288
    """
    rows = _int(ds.get("Rows"))
    cols = _int(ds.get("Columns"))
    frames = max(1, _int(ds.get("NumberOfFrames"), 1))
    samples = max(1, _int(ds.get("SamplesPerPixel"), 1))
    bits = max(1, _int(ds.get("BitsAllocated"), 16))
    return rows * cols * frames * samples * ((bits + 7) // 8)


def codestream_size(fragment: bytes) -> tuple[int, int, int, int] | None:
    """``(columns, rows, components, bytes per sample)`` a compressed frame declares.

    Reads the JPEG 2000 SIZ marker (raw codestream or inside a JP2 box) or the JPEG /
    JPEG-LS start-of-frame marker; None when neither is found in the first bytes.

    Examples
    --------
    >>> siz = b"\\xff\\x4f\\xff\\x51" + struct.pack(">HHIIIIIIIIH", 41, 0, 60000, 60000,
    ...     0, 0, 60000, 60000, 0, 0, 1) + bytes([15, 1, 1])
    >>> codestream_size(siz)
    (60000, 60000, 1, 2)
    """
    head = fragment[:_HEAD_BYTES]
    at = head.find(b"\xff\x4f\xff\x51")
    if at >= 0 and len(head) >= at + 4 + 38 + 3:
        (_, _, x, y, x0, y0, _, _, _, _, comps) = struct.unpack(">HHIIIIIIIIH", head[at + 4 : at + 42])
        depth = (head[at + 42] & 0x7F) + 1
        return max(0, x - x0), max(0, y - y0), max(1, comps), (depth + 7) // 8
    if head[:2] == b"\xff\xd8":
        return _jpeg_sof(head)
    return None


def _jpeg_sof(head: bytes) -> tuple[int, int, int, int] | None:
    pos = 2
    while pos + 4 <= len(head):
        if head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = struct.unpack(">H", head[pos + 2 : pos + 4])[0]
        if marker in _SOF_MARKERS and pos + 10 <= len(head):
            precision, y, x, comps = struct.unpack(">BHHB", head[pos + 4 : pos + 10])
            return x, y, max(1, comps), (precision + 7) // 8
        pos += 2 + length
    return None


def _fragments(pixel_data: bytes) -> list[bytes]:
    """The first bytes of each fragment of encapsulated pixel data (offset table skipped)."""
    out: list[bytes] = []
    pos, first = 0, True
    while pos + 8 <= len(pixel_data) and pixel_data[pos : pos + 4] == _ITEM:
        length = struct.unpack("<I", pixel_data[pos + 4 : pos + 8])[0]
        if not first:
            out.append(bytes(pixel_data[pos + 8 : pos + 8 + min(length, _HEAD_BYTES)]))
        first = False
        pos += 8 + length
    return out


def check_declared_size(ds: Any, max_bytes: float) -> str | None:
    """Why the image may not be decoded under a budget of ``max_bytes``, or None.

    Both the header's declared size and every compressed frame's own declared size are
    checked; a codestream that claims far more than the header is refused too (decoding
    it would allocate for the codestream, not for the header).
    """
    limit_mb = max_bytes / 2**20
    declared = declared_bytes(ds)
    if declared > max_bytes:
        return (
            f"image too large to decode: declares {_int(ds.get('Columns'))}x{_int(ds.get('Rows'))}"
            f" pixels x {max(1, _int(ds.get('NumberOfFrames'), 1))} frames "
            f"({declared / 2**20:.0f} MB), over the limit of {limit_mb:.0f} MB (--max-image-mb)"
        )
    pixel_data = ds.get("PixelData")
    if pixel_data is None or not getattr(ds.file_meta, "TransferSyntaxUID", None):
        return None
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        return None
    frame_bytes = declared // max(1, _int(ds.get("NumberOfFrames"), 1))
    for fragment in _fragments(pixel_data):
        size = codestream_size(fragment)
        if size is None:
            continue
        cols, rows, comps, nbytes = size
        decoded = cols * rows * comps * nbytes
        if decoded > max_bytes or decoded > 4 * max(frame_bytes, 1):
            return (
                f"compressed frame declares {cols}x{rows} pixels ({decoded / 2**20:.0f} MB) "
                f"but the header says {_int(ds.get('Columns'))}x{_int(ds.get('Rows'))}: "
                "refused before decoding (decompression bomb?)"
            )
    return None


def check_deflated_size(path: Any, max_bytes: float | None) -> str | None:
    """Why a deflated file may not be inflated under ``max_bytes``, or None.

    For a file in the Deflated Explicit VR Little Endian transfer syntax, inflates the
    dataset 64 KB at a time (at most 1 MB of output per step, none of it kept) and gives
    up once it passes ``max_bytes`` plus :data:`DEFLATE_HEADER_ALLOWANCE`. Any other file,
    or a stream that is not valid deflate data (pydicom then says so), gives None.
    """
    import zlib

    if max_bytes is None:
        return None
    with open(path, "rb") as fh:
        if _DEFLATED_UID not in fh.read(_META_BYTES):
            return None
        start = _dataset_start(fh)
        if start is None:
            return None
        fh.seek(start)
        cap = float(max_bytes) + DEFLATE_HEADER_ALLOWANCE
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        try:
            while not inflater.eof:
                data = fh.read(1 << 16)
                if not data:
                    break
                while data and not inflater.eof:
                    total += len(inflater.decompress(data, 1 << 20))
                    if total > cap:
                        return (
                            f"deflated data expands past {cap / 2**20:.0f} MB, over the limit "
                            f"of {max_bytes / 2**20:.0f} MB (--max-image-mb): refused before "
                            "inflating the rest (decompression bomb?)"
                        )
                    data = inflater.unconsumed_tail
        except zlib.error:
            return None  # not deflate data at all: pydicom's own error names it
    return None


def deflated_header(path: Any, max_out: int = 1 << 20) -> Any:
    """The header tags (up to group 0028) of a deflated file, inflating at most ``max_out``
    bytes; None when they cannot be read. Lets a refused bomb still name its series."""
    import zlib

    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset

    with open(path, "rb") as fh:
        start = _dataset_start(fh)
        if start is None:
            return None
        fh.seek(start)
        try:
            head = zlib.decompressobj(-zlib.MAX_WBITS).decompress(fh.read(1 << 16), max_out)
        except zlib.error:
            return None
    try:
        return read_dataset(
            DicomBytesIO(head), False, True,
            stop_when=lambda tag, vr, length: tag.group > 0x0028,
        )
    except Exception:  # noqa: BLE001 - cut mid-element or damaged: no header to offer
        return None


def _dataset_start(fh: Any) -> int | None:
    """Offset of the dataset after the file meta group, if it is the deflated syntax."""
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    try:
        fh.seek(0)
        read_preamble(fh, True)
        meta = _read_file_meta_info(fh)
    except Exception:  # noqa: BLE001 - a damaged meta group: pydicom reports it when reading
        return None
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return None
    return fh.tell()


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default
