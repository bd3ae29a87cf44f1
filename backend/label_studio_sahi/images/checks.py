"""Structural checks of PNG and JPEG bytes, run before any native decoder sees them.

libpng and libjpeg do not fail cleanly on every malformed file: torchvision's PNG decoder
dies with SIGSEGV on a PNG whose IDAT holds fewer rows than its IHDR promises, and libjpeg
fills a cut JPEG that ends in an appended EOI marker with grey instead of failing. So every
PNG and JPEG is walked here first, in Python and zlib/libjpeg calls that report errors:

* PNG: the signature, every chunk's length and CRC, IHDR first and valid, PLTE and tRNS
  where the colour type allows them, IDAT chunks consecutive, IEND last (only NUL padding
  after it); then the IDAT stream is inflated in bounded pieces, counting bytes without
  keeping them, and must hold exactly the bytes the IHDR implies, with a filter type of
  0-4 at each row start and a complete zlib stream.
* JPEG: the markers (SOI, segment lengths, one supported SOF with a non-zero size, SOS
  headers naming its components, EOI), progressive scans that reach every coefficient's
  last bit, then an entropy decode at 1/8 scale by libjpeg-turbo (``simplejpeg``) with
  its warnings made errors, which finds scan data cut short even when an EOI follows.

Each problem raises ``ImageFormatError`` with a message naming it. ``check_structure``
returns what a decoder may rely on, including whether the file is plain enough for
torchvision's decoders.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from typing import cast

# ISA-L inflates 2-3x faster than zlib (same API): it keeps the PNG check cheap next to
# decoding (measured: about a fifth of torchvision's decode of a 4000x3000 PNG).
from isal import isal_zlib

from label_studio_sahi.errors import ImageFormatError

# isal's stub declares its error an instance, not a class; at run time it is a class.
_INFLATE_ERRORS: tuple[type[Exception], ...] = (
    zlib.error,
    cast("type[Exception]", isal_zlib.error),
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"

# Inflated bytes examined at a time: bounded memory whatever the image size.
INFLATE_PIECE = 1 << 20


@dataclass(frozen=True)
class ImageStructure:
    """What the walk of a file found: its format, size, and whether torchvision may decode it
    (8-bit non-interlaced grey/RGB PNG without tRNS; 8-bit Huffman baseline or progressive
    JPEG with 1 or 3 components), and whether it may carry EXIF metadata."""

    format: str
    width: int
    height: int
    torchvision_safe: bool
    # False only where the walk saw every chunk and none can hold EXIF (a PNG without
    # eXIf or text chunks): Pillow reads a PNG's EXIF by decoding the whole image first.
    may_have_exif: bool = True


def check_structure(data: bytes) -> ImageStructure | None:
    """Check a PNG or JPEG file's structure; None for other formats (left to PIL).

    Call it only after the pixel count from the header is within limits: a PNG's image
    data is inflated (not kept), which takes time in proportion to its pixels.
    """
    if data.startswith(PNG_SIGNATURE):
        return check_png(data)
    if data.startswith(JPEG_SOI):
        return check_jpeg(data)
    return None


# --- PNG ------------------------------------------------------------------------------

# Colour type -> (name, channels, legal bit depths), from the PNG specification, 11.2.2.
_COLOUR_TYPES: dict[int, tuple[str, int, tuple[int, ...]]] = {
    0: ("greyscale", 1, (1, 2, 4, 8, 16)),
    2: ("RGB", 3, (8, 16)),
    3: ("palette", 1, (1, 2, 4, 8)),
    4: ("greyscale+alpha", 2, (8, 16)),
    6: ("RGBA", 4, (8, 16)),
}
# Adam7: (x0, y0, dx, dy) of each pass.
_ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)
_FILTER_TYPES = bytes(range(5))
_KNOWN_CRITICAL = frozenset({b"IHDR", b"PLTE", b"IDAT", b"IEND"})


@dataclass(frozen=True)
class _Header:
    width: int
    height: int
    bit_depth: int
    colour_type: int
    interlaced: bool

    @property
    def shown(self) -> str:
        return f"{self.width}x{self.height}"

    def passes(self) -> list[tuple[int, int, int]]:
        """(first byte, end byte, row stride) of each pass's rows in the inflated stream."""
        channels = _COLOUR_TYPES[self.colour_type][1]
        bits = channels * self.bit_depth
        sizes = (
            [(self.width, self.height)]
            if not self.interlaced
            else [
                ((self.width - x0 + dx - 1) // dx, (self.height - y0 + dy - 1) // dy)
                for x0, y0, dx, dy in _ADAM7
            ]
        )
        out, start = [], 0
        for width, height in sizes:
            if width <= 0 or height <= 0:
                continue  # a pass with no pixels has no rows, not even filter bytes
            stride = 1 + (width * bits + 7) // 8
            out.append((start, start + height * stride, stride))
            start += height * stride
        return out


_EXIF_CHUNKS = frozenset({b"eXIf", b"tEXt", b"zTXt", b"iTXt"})


def check_png(data: bytes) -> ImageStructure:
    """Walk a PNG's chunks and inflate its image data; raise ImageFormatError on a problem."""
    view = memoryview(data)
    size = len(data)
    pos = len(PNG_SIGNATURE)
    header: _Header | None = None
    palette_entries: int | None = None
    transparency = False
    idat: list[memoryview] = []
    idat_done = False  # an IDAT run ended: another IDAT would not be consecutive
    exif = False  # eXIf, or a text chunk (Pillow also reads "Raw profile type exif")
    previous = "the signature"
    while True:
        if pos == size:
            raise ImageFormatError(
                f"the PNG is truncated: it ends after {previous} (byte {pos:,}), before IEND"
            )
        if pos + 12 > size:
            raise ImageFormatError(
                f"the PNG is truncated: {size - pos} bytes after {previous}, too few for a chunk"
            )
        length, kind = struct.unpack_from(">I4s", data, pos)
        name = kind.decode("latin-1")
        if not kind.isalpha() or not kind.isascii():
            raise ImageFormatError(f"the PNG is corrupt: an invalid chunk type at byte {pos:,}")
        if length > 0x7FFFFFFF or pos + 12 + length > size:
            raise ImageFormatError(
                f"the PNG is truncated: its {name} chunk at byte {pos:,} needs {length:,} "
                f"bytes, the file has {max(size - pos - 12, 0):,} left"
            )
        body = view[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack_from(">I", data, pos + 8 + length)
        if zlib.crc32(view[pos + 4 : pos + 8 + length]) != crc:
            raise ImageFormatError(f"the PNG is corrupt: the CRC of its {name} chunk is wrong")
        if header is None and kind != b"IHDR":
            raise ImageFormatError(f"the PNG is corrupt: its first chunk is {name}, not IHDR")

        if kind == b"IHDR":
            if header is not None:
                raise ImageFormatError("the PNG is corrupt: it has a second IHDR chunk")
            header = _png_header(body)
        elif kind == b"IDAT":
            if idat_done:
                raise ImageFormatError("the PNG is corrupt: its IDAT chunks are not consecutive")
            idat.append(body)
        elif kind == b"IEND":
            if length:
                raise ImageFormatError("the PNG is corrupt: its IEND chunk is not empty")
            trailing = view[pos + 12 :]
            if bytes(trailing).strip(b"\0"):
                raise ImageFormatError(
                    f"the PNG is corrupt: {len(trailing):,} bytes follow its IEND chunk"
                )
            break
        elif kind[0] < 0x61 and kind not in _KNOWN_CRITICAL:  # upper case: critical
            raise ImageFormatError(f"the PNG has an unknown critical chunk {name}")
        else:
            assert header is not None
            if idat and kind in (b"PLTE", b"tRNS"):
                raise ImageFormatError(f"the PNG is corrupt: its {name} chunk follows IDAT")
            if kind == b"PLTE":
                palette_entries = _png_palette(body, header, palette_entries)
            elif kind == b"tRNS":
                _png_transparency(body, header, palette_entries, transparency)
                transparency = True
        if kind in _EXIF_CHUNKS:
            exif = True
        if idat and kind != b"IDAT":
            idat_done = True
        previous = f"its {name} chunk"
        pos += 12 + length

    assert header is not None  # IEND is never first
    if not idat:
        raise ImageFormatError("the PNG has no image data (no IDAT chunk)")
    if header.colour_type == 3 and palette_entries is None:
        raise ImageFormatError("the PNG is corrupt: a palette image without a PLTE chunk")
    _inflate_png(idat, header)
    return ImageStructure(
        "PNG",
        header.width,
        header.height,
        torchvision_safe=header.bit_depth == 8
        and header.colour_type in (0, 2)
        and not header.interlaced
        and not transparency,
        may_have_exif=exif,
    )


def _png_header(body: memoryview) -> _Header:
    if len(body) != 13:
        raise ImageFormatError(f"the PNG is corrupt: its IHDR chunk is {len(body)} bytes, not 13")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(
        ">IIBBBBB", body
    )
    if not 0 < width <= 0x7FFFFFFF or not 0 < height <= 0x7FFFFFFF:
        raise ImageFormatError(f"the PNG's IHDR gives an invalid size {width}x{height}")
    if colour not in _COLOUR_TYPES:
        raise ImageFormatError(f"the PNG's IHDR gives an invalid colour type {colour}")
    name, _, depths = _COLOUR_TYPES[colour]
    if depth not in depths:
        raise ImageFormatError(f"the PNG's IHDR gives an invalid bit depth {depth} for {name}")
    if compression or filtering or interlace > 1:
        raise ImageFormatError(
            "the PNG's IHDR gives an unknown compression, filter or interlace method"
        )
    return _Header(width, height, depth, colour, bool(interlace))


def _png_palette(body: memoryview, header: _Header, seen: int | None) -> int:
    if seen is not None:
        raise ImageFormatError("the PNG is corrupt: it has a second PLTE chunk")
    if header.colour_type in (0, 4):
        raise ImageFormatError("the PNG is corrupt: a greyscale image with a PLTE chunk")
    entries, rest = divmod(len(body), 3)
    limit = 2**header.bit_depth if header.colour_type == 3 else 256
    if rest or not 0 < entries <= min(limit, 256):
        raise ImageFormatError(f"the PNG is corrupt: its PLTE chunk is {len(body)} bytes long")
    return entries


def _png_transparency(
    body: memoryview, header: _Header, palette_entries: int | None, seen: bool
) -> None:
    if seen:
        raise ImageFormatError("the PNG is corrupt: it has a second tRNS chunk")
    colour = header.colour_type
    if colour in (4, 6):
        raise ImageFormatError("the PNG is corrupt: a tRNS chunk in an image with alpha")
    if colour == 3:
        if palette_entries is None:
            raise ImageFormatError("the PNG is corrupt: its tRNS chunk comes before PLTE")
        if len(body) > palette_entries:
            raise ImageFormatError("the PNG is corrupt: its tRNS chunk is longer than PLTE")
    elif len(body) != (2 if colour == 0 else 6):
        raise ImageFormatError(f"the PNG is corrupt: its tRNS chunk is {len(body)} bytes long")


def _inflate_png(idat: list[memoryview], header: _Header) -> None:
    """Inflate the IDAT stream piece by piece: exactly the bytes the header implies, each
    row starting with a filter type 0-4, and the zlib stream complete."""
    passes = header.passes()
    needed = passes[-1][1]
    inflater = isal_zlib.decompressobj()
    produced = 0

    def take(piece: bytes) -> None:
        nonlocal produced
        if produced + len(piece) > needed:
            raise ImageFormatError(
                f"the PNG is corrupt: IDAT holds more than the {needed:,} bytes "
                f"the {header.shown} header needs"
            )
        _check_filter_bytes(piece, produced, passes)
        produced += len(piece)

    try:
        for chunk in idat:
            pending: bytes | memoryview = chunk
            while pending:
                if inflater.eof:
                    raise ImageFormatError(
                        "the PNG is corrupt: IDAT holds data after the end of its zlib stream"
                    )
                take(inflater.decompress(pending, INFLATE_PIECE))
                pending = inflater.unconsumed_tail
        # The last input may leave output pending (a match not yet copied out): drain it.
        while not inflater.eof:
            piece = inflater.decompress(b"", INFLATE_PIECE)
            if not piece:
                break
            take(piece)
        if inflater.unused_data:
            raise ImageFormatError(
                "the PNG is corrupt: IDAT holds data after the end of its zlib stream"
            )
    except _INFLATE_ERRORS as exc:
        raise ImageFormatError(f"the PNG's image data is corrupt (zlib: {exc})") from None
    if produced < needed:
        raise ImageFormatError(
            f"the PNG is truncated: IDAT holds {produced:,} of {needed:,} bytes "
            f"the {header.shown} header needs"
        )
    if not inflater.eof:
        raise ImageFormatError("the PNG is truncated: its zlib stream has no end")


def _check_filter_bytes(piece: bytes, offset: int, passes: list[tuple[int, int, int]]) -> None:
    """The filter-type byte at every row start inside ``piece`` (which begins at byte
    ``offset`` of the inflated stream) is 0-4; a strided slice keeps this at C speed."""
    end = offset + len(piece)
    for number, (start, stop, stride) in enumerate(passes):
        low, high = max(offset, start), min(end, stop)
        if low >= high:
            continue
        first = start + -(-(low - start) // stride) * stride
        if first >= high:
            continue
        starts = piece[first - offset : high - offset : stride]
        if starts.translate(None, _FILTER_TYPES):
            bad = next(i for i, value in enumerate(starts) if value > 4)
            row = (first - start) // stride + bad
            where = f"row {row:,}" + (f" of interlace pass {number + 1}" if len(passes) > 1 else "")
            raise ImageFormatError(
                f"the PNG is corrupt: {where} has filter type {starts[bad]} (only 0-4 exist)"
            )


# --- JPEG -----------------------------------------------------------------------------

_SOF_NAMES = {
    0xC0: "baseline",
    0xC1: "extended sequential",
    0xC2: "progressive",
    0xC3: "lossless",
    0xC5: "differential sequential",
    0xC6: "differential progressive",
    0xC7: "differential lossless",
    0xC9: "arithmetic sequential",
    0xCA: "arithmetic progressive",
    0xCB: "arithmetic lossless",
    0xCD: "arithmetic differential sequential",
    0xCE: "arithmetic differential progressive",
    0xCF: "arithmetic differential lossless",
}
_SUPPORTED_SOF = (0xC0, 0xC1, 0xC2)
# The end of a scan's entropy-coded data: 0xFF followed by a byte that is neither a
# stuffed zero, a restart marker (RST0-7) nor another fill 0xFF.
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


@dataclass
class _Frame:
    marker: int
    precision: int
    width: int
    height: int
    components: list[int]
    # Progressive: for each component, which of the 64 coefficients reached their last bit.
    final: dict[int, set[int]]


def check_jpeg(data: bytes) -> ImageStructure:
    """Walk a JPEG's markers, then entropy-decode it at 1/8 scale with libjpeg's warnings as
    errors; raise ImageFormatError on a problem."""
    frame = _walk_jpeg(data)
    _entropy_check(data, frame)
    return ImageStructure(
        "JPEG",
        frame.width,
        frame.height,
        torchvision_safe=frame.precision == 8 and len(frame.components) in (1, 3),
    )


def _walk_jpeg(data: bytes) -> _Frame:
    size = len(data)
    pos = 2
    frame: _Frame | None = None
    scans = 0
    while True:
        # Markers may be preceded by any number of 0xFF fill bytes.
        if pos >= size:
            raise ImageFormatError(
                f"the JPEG is truncated: it ends at byte {size:,} before its EOI marker"
            )
        if data[pos] != 0xFF:
            raise ImageFormatError(f"the JPEG is corrupt: no marker at byte {pos:,}")
        while pos < size and data[pos] == 0xFF:
            pos += 1
        if pos >= size:
            raise ImageFormatError("the JPEG is truncated: it ends inside a marker")
        marker = data[pos]
        pos += 1
        if marker == 0xD9:  # EOI; anything after it (an MPO's next picture, a trailer) stays unread
            break
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker in (0x00, 0x01):
            raise ImageFormatError(
                f"the JPEG is corrupt: unexpected marker 0xFF{marker:02X} at byte {pos - 2:,}"
            )
        if pos + 2 > size:
            raise ImageFormatError("the JPEG is truncated: it ends inside a marker segment")
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2 or pos + length > size:
            raise ImageFormatError(
                f"the JPEG is truncated: its 0xFF{marker:02X} segment at byte {pos - 2:,} "
                f"needs {length:,} bytes, the file has {size - pos:,} left"
            )
        segment = data[pos + 2 : pos + length]
        pos += length
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if frame is not None:
                raise ImageFormatError("the JPEG is corrupt: it has a second SOF marker")
            frame = _jpeg_frame(marker, segment)
        elif marker == 0xDA:
            if frame is None:
                raise ImageFormatError("the JPEG is corrupt: a scan (SOS) before the frame (SOF)")
            _jpeg_scan(segment, frame)
            scans += 1
            found = _SCAN_END.search(data, pos)
            if found is None:
                raise ImageFormatError(
                    f"the JPEG is truncated: scan {scans}'s data runs to the end of the file "
                    "with no EOI"
                )
            pos = found.start()
        elif marker == 0xDC:
            raise ImageFormatError("the JPEG uses a DNL marker (height defined later): unsupported")
    if frame is None:
        raise ImageFormatError("the JPEG is corrupt: it has no frame (SOF) marker")
    if not scans:
        raise ImageFormatError("the JPEG is corrupt: it has no scan (SOS) before EOI")
    incomplete = [c for c in frame.components if len(frame.final[c]) < 64]
    if incomplete:
        what = "progressive scans stop" if frame.marker == 0xC2 else "scans stop"
        raise ImageFormatError(
            f"the JPEG is truncated: its {what} before every component is complete "
            f"({scans} scans, then EOI)"
        )
    return frame


def _jpeg_frame(marker: int, segment: bytes) -> _Frame:
    name = _SOF_NAMES.get(marker, f"SOF{marker - 0xC0}")
    if marker not in _SUPPORTED_SOF:
        raise ImageFormatError(
            f"the JPEG is {name} (SOF{marker - 0xC0}), which is not supported: "
            "only baseline, extended sequential and progressive Huffman JPEG are"
        )
    if len(segment) < 6:
        raise ImageFormatError("the JPEG is corrupt: its SOF segment is too short")
    precision, height, width, count = struct.unpack_from(">BHHB", segment)
    if precision != 8:
        raise ImageFormatError(f"the JPEG has {precision}-bit samples: only 8-bit is supported")
    if not width or not height:
        raise ImageFormatError(f"the JPEG's SOF gives an invalid size {width}x{height}")
    if count not in (1, 3, 4) or len(segment) != 6 + 3 * count:
        raise ImageFormatError(
            f"the JPEG is corrupt: its SOF gives {count} components in {len(segment)} bytes"
        )
    components = []
    for i in range(count):
        ident, sampling, table = struct.unpack_from(">BBB", segment, 6 + 3 * i)
        if not (1 <= sampling >> 4 <= 4 and 1 <= sampling & 15 <= 4) or table > 3:
            raise ImageFormatError("the JPEG is corrupt: its SOF has invalid component factors")
        if ident in components:
            raise ImageFormatError("the JPEG is corrupt: its SOF repeats a component id")
        components.append(ident)
    return _Frame(marker, precision, width, height, components, {c: set() for c in components})


def _jpeg_scan(segment: bytes, frame: _Frame) -> None:
    count = segment[0] if segment else 0
    if not 1 <= count <= 4 or len(segment) != 4 + 2 * count:
        raise ImageFormatError("the JPEG is corrupt: an invalid scan (SOS) header")
    selected = [segment[1 + 2 * i] for i in range(count)]
    if any(ident not in frame.final for ident in selected):
        raise ImageFormatError("the JPEG is corrupt: a scan names a component its SOF has not")
    first, last, approximation = segment[1 + 2 * count : 4 + 2 * count]
    if frame.marker != 0xC2:
        first, last, approximation = 0, 63, 0  # sequential: every scan carries it all
    elif first > last or last > 63 or (first == 0 and last != 0):
        raise ImageFormatError("the JPEG is corrupt: a progressive scan's spectral range")
    if approximation & 15 == 0:  # the scan brings these coefficients to their last bit
        for ident in selected:
            frame.final[ident].update(range(first, last + 1))


def _entropy_check(data: bytes, frame: _Frame) -> None:
    # libjpeg fills scan data that stops early (a cut file, an EOI appended) with zeros and
    # only warns; simplejpeg's strict mode turns every warning into ValueError. At 1/8
    # scale the coefficients are still all entropy-decoded but the IDCT is cheap.
    import simplejpeg

    colorspace = {1: "GRAY", 3: "RGB", 4: "CMYK"}[len(frame.components)]
    try:
        simplejpeg.decode_jpeg(data, colorspace=colorspace, min_height=1, min_width=1, strict=True)
    except ValueError as exc:
        reason = str(exc).strip() or "unknown"
        if "premature end" in reason.lower():
            raise ImageFormatError(
                f"the JPEG is truncated: its scan data stops early (libjpeg: {reason})"
            ) from None
        raise ImageFormatError(f"the JPEG is corrupt (libjpeg: {reason})") from None
