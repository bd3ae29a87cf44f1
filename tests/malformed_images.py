"""A seeded corpus of malformed and unusual image files, and a decode loop to run them in.

``corpus()`` returns (name, bytes, expected) triples: ``expected`` is ``REFUSED`` (the
decoders must raise an ``ImageError`` with a message) or the RGB pixels (HWC uint8) both
``decode_pixels`` and ``decode_image`` must give. Pixels are exact where the encoding is
lossless (made from known arrays); for JPEG they are a reference decode of the intact
file by PIL (libjpeg-turbo, as the backend's decoders), EXIF-transposed.

``serve_decodes()`` is the child side of tests/unit/images/test_malformed_images.py: it decodes files
sent over stdin in a loop and answers over stdout, so that a decoder crash kills the child,
not pytest.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import struct
import sys
import zlib
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

REFUSED: Literal["refused"] = "refused"
Expected = np.ndarray | Literal["refused"]
Case = tuple[str, bytes, Expected]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- PNG building blocks --------------------------------------------------------------


def chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    value = zlib.crc32(kind + body) if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", value)


def ihdr(width: int, height: int, depth: int = 8, colour: int = 2, interlace: int = 0) -> bytes:
    return chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace))


def raw_png(
    width: int,
    height: int,
    rows: bytes,
    *,
    depth: int = 8,
    colour: int = 2,
    extra: bytes = b"",
    idat_parts: int = 1,
) -> bytes:
    """A PNG from already filtered rows (each starting with its filter byte)."""
    data = zlib.compress(rows)
    step = -(-len(data) // idat_parts)
    idat = b"".join(chunk(b"IDAT", data[i : i + step]) for i in range(0, len(data), step))
    return PNG_SIGNATURE + ihdr(width, height, depth, colour) + extra + idat + chunk(b"IEND", b"")


def rgb_rows(pixels: np.ndarray, filter_type: int = 0) -> bytes:
    return b"".join(bytes([filter_type]) + row.tobytes() for row in pixels)


def chunks_of(data: bytes) -> list[tuple[int, int, bytes]]:
    """(start, end, type) of each chunk of a well-formed PNG."""
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        out.append((pos, pos + 12 + length, data[pos + 4 : pos + 8]))
        pos += 12 + length
    return out


def recrc(data: bytes) -> bytes:
    """The PNG with every chunk's CRC recomputed (so that a lie is caught by meaning)."""
    out = bytearray(data)
    for start, end, _ in chunks_of(data):
        struct.pack_into(">I", out, end - 4, zlib.crc32(bytes(out[start + 4 : end - 4])))
    return bytes(out)


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def reference(data: bytes) -> np.ndarray:
    """PIL's decode of an intact file, as the backend orients and converts it."""
    with Image.open(io.BytesIO(data)) as image:
        upright = ImageOps.exif_transpose(image)
        return np.asarray(upright.convert("RGB"))


def short_idat_png(width: int, height: int, rows: int) -> bytes:
    """The file that crashed torchvision: the IHDR's size, IDAT for only ``rows`` rows."""
    raw = b"".join(b"\0" + bytes(width * 3) for _ in range(rows))
    return raw_png(width, height, raw)


# --- the corpus -----------------------------------------------------------------------


def corpus(seed: int = 0) -> list[Case]:
    rng = np.random.default_rng(seed)
    cuts = random.Random(seed)
    cases: list[Case] = []
    cases += _png_cases(rng, cuts)
    cases += _jpeg_cases(rng, cuts)
    cases += _other_format_cases(rng)
    names = [name for name, _, _ in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return cases


def _png_cases(rng: np.random.Generator, cuts: random.Random) -> list[Case]:
    cases: list[Case] = []
    pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    good = raw_png(32, 24, rgb_rows(pixels), idat_parts=4)
    cases.append(("png-good-rgb", good, pixels))

    # Cut at every chunk boundary and inside every chunk, plus seeded random cuts.
    spans = chunks_of(good)
    for start, end, kind in spans:
        name = kind.decode()
        cases.append((f"png-cut-before-{name}@{start}", good[:start], REFUSED))
        for where in sorted({start + 4, start + 8, (start + end) // 2, end - 1}):
            cases.append((f"png-cut-inside-{name}@{where}", good[:where], REFUSED))
    for where in sorted(cuts.sample(range(9, len(good) - 12), 20)):
        cases.append((f"png-cut-random@{where}", good[:where], REFUSED))
    # A cut file with a well-formed IEND appended (the equivalent of a padded JPEG).
    for start, _, kind in spans[1:-1]:
        cases.append(
            (
                f"png-cut-before-{kind.decode()}@{start}+IEND",
                good[:start] + chunk(b"IEND", b""),
                REFUSED,
            )
        )

    # The crash of the issue, at three sizes.
    for side in (64, 512, 3000):
        cases.append((f"png-{side}x{side}-idat-4-rows", short_idat_png(side, side, 4), REFUSED))

    rows = rgb_rows(pixels)
    cases += [
        ("png-idat-short-one-byte", raw_png(32, 24, rows[:-1]), REFUSED),
        ("png-idat-overlong-one-row", raw_png(32, 24, rows + rows[: 1 + 96]), REFUSED),
        ("png-idat-overlong-one-byte", raw_png(32, 24, rows + b"\0"), REFUSED),
        (
            "png-ihdr-lies-taller",
            recrc(good.replace(struct.pack(">II", 32, 24), struct.pack(">II", 32, 40), 1)),
            REFUSED,
        ),
        (
            "png-ihdr-lies-wider",
            recrc(good.replace(struct.pack(">II", 32, 24), struct.pack(">II", 64, 24), 1)),
            REFUSED,
        ),
        (
            "png-ihdr-lies-shorter",
            recrc(good.replace(struct.pack(">II", 32, 24), struct.pack(">II", 32, 12), 1)),
            REFUSED,
        ),
        (
            "png-ihdr-lies-narrower",
            recrc(good.replace(struct.pack(">II", 32, 24), struct.pack(">II", 16, 24), 1)),
            REFUSED,
        ),
        (
            "png-ihdr-zero-width",
            recrc(good.replace(struct.pack(">II", 32, 24), struct.pack(">II", 0, 24), 1)),
            REFUSED,
        ),
        ("png-ihdr-bad-depth", PNG_SIGNATURE + ihdr(32, 24, depth=7) + good[33:], REFUSED),
        ("png-ihdr-bad-colour", PNG_SIGNATURE + ihdr(32, 24, colour=5) + good[33:], REFUSED),
        ("png-ihdr-rgb-depth-4", PNG_SIGNATURE + ihdr(32, 24, depth=4) + good[33:], REFUSED),
        ("png-ihdr-bad-interlace", PNG_SIGNATURE + ihdr(32, 24, interlace=2) + good[33:], REFUSED),
        ("png-no-ihdr", PNG_SIGNATURE + good[33:], REFUSED),
        ("png-no-iend", good[: spans[-1][0]], REFUSED),
        ("png-no-idat", PNG_SIGNATURE + ihdr(32, 24) + chunk(b"IEND", b""), REFUSED),
        (
            "png-zlib-junk-after-stream",
            raw_png(32, 24, b"")[:33]
            + chunk(b"IDAT", zlib.compress(rows) + b"junk")
            + chunk(b"IEND", b""),
            REFUSED,
        ),
        (
            "png-zlib-no-end",
            PNG_SIGNATURE
            + ihdr(32, 24)
            + chunk(b"IDAT", _unfinished_zlib(rows))
            + chunk(b"IEND", b""),
            REFUSED,
        ),
        (
            "png-zlib-garbage",
            PNG_SIGNATURE
            + ihdr(32, 24)
            + chunk(b"IDAT", bytes(rng.integers(0, 256, 500, dtype=np.uint8)))
            + chunk(b"IEND", b""),
            REFUSED,
        ),
        ("png-idat-not-consecutive", _split_idat_with(good, chunk(b"tEXt", b"k\0v")), REFUSED),
        ("png-unknown-critical-chunk", good[:33] + chunk(b"ABCD", b"x") + good[33:], REFUSED),
        ("png-junk-after-iend", good + b"trailing junk", REFUSED),
        ("png-nul-padding-after-iend", good + bytes(100), pixels),
        ("png-empty-trailing-idat", _insert_before_iend(good, chunk(b"IDAT", b"")), pixels),
        ("png-ancillary-text", good[:33] + chunk(b"tEXt", b"Comment\0hello") + good[33:], pixels),
    ]
    # Wrong CRCs: one per chunk.
    for start, end, kind in spans:
        broken = bytearray(good)
        broken[end - 1] ^= 0x01
        cases.append((f"png-bad-crc-{kind.decode()}@{start}", bytes(broken), REFUSED))
    # A flipped byte inside each IDAT, CRC fixed up: the zlib stream itself is corrupt.
    for start, end, kind in spans:
        if kind == b"IDAT" and end - start > 16:
            broken = bytearray(good)
            broken[start + 10] ^= 0xFF
            cases.append((f"png-idat-flipped-byte@{start + 10}", recrc(bytes(broken)), REFUSED))

    # Bad filter bytes, at the first, a middle and the last row.
    for row in (0, 11, 23):
        bad = bytearray(rows)
        bad[row * 97] = 5 + row % 200
        cases.append((f"png-bad-filter-row-{row}", raw_png(32, 24, bytes(bad)), REFUSED))
    cases.append(("png-filters-sub-up-avg-paeth", _all_filters_png(pixels), pixels))

    # Lawful but unusual: 16-bit, palette (with and without tRNS), interlaced, grey+alpha.
    cases += _png_variants(rng)
    return cases


def _unfinished_zlib(data: bytes) -> bytes:
    """All of ``data`` deflated and flushed, but without the final block and checksum."""
    deflater = zlib.compressobj()
    return deflater.compress(data) + deflater.flush(zlib.Z_SYNC_FLUSH)


def _split_idat_with(good: bytes, between: bytes) -> bytes:
    idat = [span for span in chunks_of(good) if span[2] == b"IDAT"]
    cut = idat[1][0]
    return good[:cut] + between + good[cut:]


def _insert_before_iend(good: bytes, extra: bytes) -> bytes:
    iend = chunks_of(good)[-1][0]
    return good[:iend] + extra + good[iend:]


def _all_filters_png(pixels: np.ndarray) -> bytes:
    """Rows filtered with each of the five filter types in turn (the check must accept all)."""
    height, width, _ = pixels.shape
    out = bytearray()
    prev = np.zeros(width * 3, dtype=np.int32)
    for y in range(height):
        cur = pixels[y].reshape(-1).astype(np.int32)
        left = np.concatenate([np.zeros(3, np.int32), cur[:-3]])
        up_left = np.concatenate([np.zeros(3, np.int32), prev[:-3]])
        kind = y % 5
        if kind == 0:
            row = cur
        elif kind == 1:
            row = cur - left
        elif kind == 2:
            row = cur - prev
        elif kind == 3:
            row = cur - (left + prev) // 2
        else:
            p = left + prev - up_left
            pa, pb, pc = np.abs(p - left), np.abs(p - prev), np.abs(p - up_left)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, up_left))
            row = cur - pred
        out += bytes([kind]) + (row % 256).astype(np.uint8).tobytes()
        prev = cur
    return raw_png(width, height, bytes(out))


def _png_variants(rng: np.random.Generator) -> list[Case]:
    cases: list[Case] = []
    pixels = rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)
    # 16-bit RGB: PIL keeps the high byte; values v*257 make that exactly v.
    wide = pixels.astype(">u2") * 257
    cases.append(
        (
            "png-16bit-rgb",
            raw_png(28, 20, b"".join(b"\0" + r.tobytes() for r in wide), depth=16),
            pixels,
        )
    )
    # 16-bit grey spanning 0..65535 is scaled by 255/65535: exactly v again.
    grey = rng.integers(0, 256, (20, 28), dtype=np.uint8)
    grey[0, 0], grey[0, 1] = 0, 255
    grey16 = grey.astype(">u2") * 257
    cases.append(
        (
            "png-16bit-grey",
            raw_png(28, 20, b"".join(b"\0" + r.tobytes() for r in grey16), depth=16, colour=0),
            np.repeat(grey[..., None], 3, 2),
        )
    )
    cases.append(
        (
            "png-8bit-grey",
            raw_png(28, 20, b"".join(b"\0" + r.tobytes() for r in grey), colour=0),
            np.repeat(grey[..., None], 3, 2),
        )
    )
    # Palette, 4-bit, with and without tRNS (alpha 0 or 255 only: exact on white).
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, (20, 28), dtype=np.uint8)
    packed = b"".join(b"\0" + bytes((r[0::2] << 4) | r[1::2]) for r in index)
    plte = chunk(b"PLTE", palette.tobytes())
    cases.append(
        ("png-palette-4bit", raw_png(28, 20, packed, depth=4, colour=3, extra=plte), palette[index])
    )
    alpha = np.where(np.arange(16) % 3 == 0, 0, 255).astype(np.uint8)
    trns = chunk(b"tRNS", alpha.tobytes())
    on_white = np.where(alpha[index][..., None] == 0, 255, palette[index]).astype(np.uint8)
    cases.append(
        (
            "png-palette-4bit-trns",
            raw_png(28, 20, packed, depth=4, colour=3, extra=plte + trns),
            on_white,
        )
    )
    cases += [
        ("png-palette-without-plte", raw_png(28, 20, packed, depth=4, colour=3), REFUSED),
        (
            "png-palette-plte-too-long",
            raw_png(28, 20, packed, depth=4, colour=3, extra=chunk(b"PLTE", bytes(17 * 3))),
            REFUSED,
        ),
        (
            "png-palette-trns-longer-than-plte",
            raw_png(28, 20, packed, depth=4, colour=3, extra=plte + chunk(b"tRNS", bytes(17))),
            REFUSED,
        ),
        (
            "png-grey-with-plte",
            raw_png(28, 20, b"".join(b"\0" + r.tobytes() for r in grey), colour=0, extra=plte),
            REFUSED,
        ),
        (
            "png-rgba-with-trns",
            raw_png(28, 20, bytes(20 * (1 + 28 * 4)), colour=6, extra=chunk(b"tRNS", bytes(6))),
            REFUSED,
        ),
    ]
    # Interlaced (Adam7): Pillow writes no interlaced PNG, so the passes are built here.
    cases.append(("png-interlaced-rgb", _adam7_png(pixels), pixels))
    bad = bytearray(_adam7_rows(pixels))
    bad[0] = 9  # the first row of pass 1
    cases.append(
        (
            "png-interlaced-bad-filter",
            _adam7_png(pixels, bytes(bad)),
            REFUSED,
        )
    )
    cases.append(("png-interlaced-short", _adam7_png(pixels, _adam7_rows(pixels)[:-30]), REFUSED))
    # Grey+alpha and RGBA (alpha 0 or 255): transparent areas come out white.
    mask = rng.integers(0, 2, (20, 28), dtype=np.uint8) * 255
    la = np.stack([grey, mask], -1)
    cases.append(
        (
            "png-grey-alpha",
            encoded(Image.fromarray(la, "LA"), "PNG"),
            np.repeat(np.where(mask == 0, 255, grey)[..., None], 3, 2).astype(np.uint8),
        )
    )
    rgba = np.concatenate([pixels, mask[..., None]], -1)
    cases.append(
        (
            "png-rgba",
            encoded(Image.fromarray(rgba, "RGBA"), "PNG"),
            np.where(mask[..., None] == 0, 255, pixels).astype(np.uint8),
        )
    )
    return cases


_ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)


def _adam7_rows(pixels: np.ndarray) -> bytes:
    out = bytearray()
    for x0, y0, dx, dy in _ADAM7:
        sub = pixels[y0::dy, x0::dx]
        if sub.size:
            out += rgb_rows(sub)
    return bytes(out)


def _adam7_png(pixels: np.ndarray, rows: bytes | None = None) -> bytes:
    height, width, _ = pixels.shape
    rows = _adam7_rows(pixels) if rows is None else rows
    return (
        PNG_SIGNATURE
        + ihdr(width, height, interlace=1)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _jpeg_cases(rng: np.random.Generator, cuts: random.Random) -> list[Case]:
    cases: list[Case] = []
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    photo = Image.fromarray(small).resize((160, 120), Image.Resampling.BICUBIC)
    baseline = encoded(photo, "JPEG", quality=90)
    progressive = encoded(photo, "JPEG", quality=90, progressive=True)
    cases.append(("jpeg-good-baseline", baseline, reference(baseline)))
    cases.append(("jpeg-good-progressive", progressive, reference(progressive)))
    cases.append(("jpeg-grey", grey := encoded(photo.convert("L"), "JPEG"), reference(grey)))
    cmyk = encoded(photo.convert("CMYK"), "JPEG")
    cases.append(("jpeg-cmyk", cmyk, reference(cmyk)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: Label Studio shows it upright
    rotated = encoded(photo, "JPEG", exif=exif.tobytes())
    cases.append(("jpeg-exif-rotated", rotated, reference(rotated)))
    assert reference(rotated).shape[:2] == (160, 120)
    # A PNG's orientation lives in an eXIf chunk: still applied on the fast path.
    rotated_png = encoded(photo, "PNG", exif=exif.tobytes())
    cases.append(("png-exif-rotated", rotated_png, reference(rotated_png)))
    assert reference(rotated_png).shape[:2] == (160, 120)
    cases.append(("jpeg-trailer-after-eoi", baseline + b"camera trailer", reference(baseline)))
    cases.append(("jpeg-444", s444 := encoded(photo, "JPEG", subsampling=0), reference(s444)))
    cases.append(("jpeg-restart-markers", rst := _with_restarts(photo), reference(rst)))

    # Cut inside the header and inside the scan data, with and without an EOI appended.
    for label, data in (("baseline", baseline), ("progressive", progressive)):
        sos = data.find(b"\xff\xda")
        points = sorted(
            {2, 4, 20, sos - 1, sos + 4}
            | set(cuts.sample(range(sos + 20, len(data) - 4), 14))
            | {len(data) - 3}
        )
        for where in points:
            cases.append((f"jpeg-{label}-cut@{where}", data[:where], REFUSED))
            cases.append((f"jpeg-{label}-cut@{where}+EOI", data[:where] + b"\xff\xd9", REFUSED))
    # A progressive file whose later scans are missing: complete scans, then EOI.
    scans = [i for i in range(len(progressive) - 1) if progressive[i : i + 2] == b"\xff\xda"]
    for number in (2, len(scans) - 1):
        cases.append(
            (
                f"jpeg-progressive-only-{number}-scans",
                progressive[: scans[number]] + b"\xff\xd9",
                REFUSED,
            )
        )

    # Lying SOF sizes (the scan data is for 160x120).
    sof = baseline.find(b"\xff\xc0")
    for label, (height, width) in {
        "taller": (240, 160), "wider": (120, 320), "shorter": (60, 160),
        "narrower": (120, 80), "zero-height": (0, 160), "zero-width": (120, 0),
    }.items():  # fmt: skip
        lie = bytearray(baseline)
        struct.pack_into(">HH", lie, sof + 5, height, width)
        cases.append((f"jpeg-sof-lies-{label}", bytes(lie), REFUSED))
    twelve = bytearray(baseline)
    twelve[sof + 4] = 12
    cases.append(("jpeg-sof-12-bit", bytes(twelve), REFUSED))
    lossless = bytearray(baseline)
    lossless[sof + 1] = 0xC3
    cases.append(("jpeg-sof-lossless", bytes(lossless), REFUSED))
    arithmetic = bytearray(baseline)
    arithmetic[sof + 1] = 0xC9
    cases.append(("jpeg-sof-arithmetic", bytes(arithmetic), REFUSED))
    cases.append(
        (
            "jpeg-no-sof",
            baseline[:sof] + baseline[sof + 2 + struct.unpack_from(">H", baseline, sof + 2)[0] :],
            REFUSED,
        )
    )
    cases.append(
        (
            "jpeg-segment-length-past-end",
            baseline[: sof + 2] + b"\xff\xf0" + baseline[sof + 4 :],
            REFUSED,
        )
    )
    cases.append(("jpeg-only-soi", b"\xff\xd8", REFUSED))
    cases.append(("jpeg-soi-eoi", b"\xff\xd8\xff\xd9", REFUSED))
    # Scan data overwritten with noise (a corrupt, not cut, file).
    sos = baseline.find(b"\xff\xda")
    noisy = bytearray(baseline)
    noise = rng.integers(0, 255, 300, dtype=np.uint8)  # no 0xFF: markers stay where they are
    noisy[sos + 40 : sos + 340] = noise.tobytes()
    cases.append(("jpeg-scan-noise", bytes(noisy), REFUSED))
    return cases


def _with_restarts(photo: Image.Image) -> bytes:
    # Pillow writes a DRI segment and RSTn markers when asked for restart intervals.
    return encoded(photo, "JPEG", quality=85, restart_marker_blocks=4)


def _other_format_cases(rng: np.random.Generator) -> list[Case]:
    cases: list[Case] = []
    frames = [rng.integers(0, 4, (18, 22), dtype=np.uint8) * 80 for _ in range(3)]
    rgb_frames = [np.repeat(f[..., None], 3, 2) for f in frames]
    images = [Image.fromarray(f) for f in rgb_frames]
    gif = encoded(images[0], "GIF", save_all=True, append_images=images[1:], duration=50, loop=0)
    cases.append(("gif-animated", gif, rgb_frames[0]))
    cases.append(("gif-cut", gif[: len(gif) // 3], REFUSED))
    webp = encoded(
        images[0], "WEBP", save_all=True, append_images=images[1:], lossless=True, duration=50
    )
    cases.append(("webp-animated", webp, rgb_frames[0]))
    cases.append(("webp-lossless", encoded(images[1], "WEBP", lossless=True), rgb_frames[1]))
    cases.append(("webp-cut", webp[: len(webp) // 2], REFUSED))
    tiff = encoded(images[0], "TIFF", save_all=True, append_images=images[1:])
    cases.append(("tiff-multipage", tiff, rgb_frames[0]))
    cases.append(("tiff-cut", tiff[: len(tiff) // 4], REFUSED))
    bmp = encoded(images[2], "BMP")
    cases.append(("bmp", bmp, rgb_frames[2]))
    cases.append(("bmp-cut", bmp[: len(bmp) // 2], REFUSED))
    # Formats outside ALLOWED_IMAGE_FORMATS' defaults: refused with the named error.
    cases.append(("not-allowed-ico", encoded(images[0], "ICO"), REFUSED))
    cases.append(("not-allowed-ppm", encoded(images[0], "PPM"), REFUSED))
    cases.append(("not-allowed-pdf-magic", b"%PDF-1.4\n" + bytes(100), REFUSED))
    cases.append(("not-an-image", b"hello, not an image", REFUSED))
    cases.append(("empty", b"", REFUSED))
    return cases


# --- the child's decode loop ------------------------------------------------------------


def digest(pixels: np.ndarray) -> str:
    """What the child answers for decoded pixels: shape, dtype and a hash of the bytes."""
    array = np.ascontiguousarray(pixels)
    return f"{array.shape}/{array.dtype}/{hashlib.sha256(array.tobytes()).hexdigest()}"


def serve_decodes() -> None:
    """Decode each file sent on stdin (4-byte length, then the bytes) with ``decode_pixels``
    and ``decode_image``; answer one JSON line per file on stdout."""
    from label_studio_sahi.errors import ImageError
    from label_studio_sahi.images.decode import decode_image, decode_pixels, rgb_pixels
    from label_studio_sahi.settings import Settings

    settings = Settings(_env_file=None, device="cpu")  # type: ignore[call-arg]
    decoders = {
        "decode_pixels": lambda data: decode_pixels(data, settings),
        "decode_image": lambda data: rgb_pixels(decode_image(data, settings)),
    }
    source, sink = sys.stdin.buffer, sys.stdout
    while header := source.read(4):
        (size,) = struct.unpack(">I", header)
        data = source.read(size)
        answer: dict[str, dict[str, str]] = {}
        for name, decode in decoders.items():
            try:
                answer[name] = {"pixels": digest(decode(data))}
            except ImageError as exc:
                answer[name] = {"refused": type(exc).__name__, "message": exc.message}
            except Exception as exc:  # not an ImageError: the test reports it
                answer[name] = {"raised": f"{type(exc).__name__}: {exc}"}
        sink.write(json.dumps(answer) + "\n")
        sink.flush()


if __name__ == "__main__":
    serve_decodes()
