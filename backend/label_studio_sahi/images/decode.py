"""Image bytes in, a checked RGB image out: the format allowed, the pixel count read from the
header before any pixel is decoded, the structure checked (``images.checks``) before a native
decoder sees the bytes, EXIF orientation applied, truncation an error. Every failure is an
``ImageError`` whose one-line message names the setting to change.
"""

from __future__ import annotations

import io
import logging
import re
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from label_studio_sahi.errors import ImageError, ImageFormatError, ImageTooLarge
from label_studio_sahi.images.checks import ImageStructure, check_structure
from label_studio_sahi.settings import Settings

log = logging.getLogger(__name__)

# Magic numbers of common formats. PIL is only allowed to try the formats in
# ALLOWED_IMAGE_FORMATS (so untrusted bytes never reach other parsers); when it finds
# none, this table lets the error say "GIF is not allowed" rather than "not an image".
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
    (b"%PDF", "PDF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"<svg", "SVG"),
    (b"<?xml", "SVG"),
)

# PIL's global LOAD_TRUNCATED_IMAGES (which some libraries, and many snippets, set to
# True) would turn a truncated download into a silently grey-padded image. Decoding here
# must fail instead, so while the global is True it is switched off around our own
# decodes, under a lock; once seen True, every decode takes the lock.
_truncation_lock = threading.Lock()
_seen_lenient_pil = False


def decode_image(data: bytes, settings: Settings) -> Image.Image:
    """Decode image bytes into an RGB image, enforcing every image limit of ``settings``.

    Checks, in order: MAX_IMAGE_BYTES, the format against ALLOWED_IMAGE_FORMATS and the
    dimensions against MAX_IMAGE_PIXELS (both from the header, before decoding), the
    structure of a PNG or JPEG (``image_checks``: a truncated or padded file is refused
    before any decoder sees it), then decodes strictly (truncated data fails), applies the
    EXIF orientation and converts to RGB (transparent areas on white, 16-bit images
    scaled rather than clipped).
    """
    image, _ = _opened_and_checked(data, settings)
    return _decode_opened(image, settings)


def decode_pixels(data: bytes, settings: Settings) -> np.ndarray:
    """``decode_image``'s pixels as one HWC uint8 array, with the same checks and errors.

    A plain JPEG or PNG (RGB or grey 8-bit, upright, whole, see ``_plain``) is decoded by
    torchvision straight into the array: PIL holds 4 bytes a pixel, and its image beside
    the array would double the memory of a large image (700 MB at 100 MP instead of 300).
    The two decoders give the same pixels (libjpeg-turbo both; tested). Anything else goes
    through PIL. Every PNG and JPEG passes ``image_checks`` first: libpng under torchvision
    crashes the process on some malformed files instead of failing.
    """
    image, structure = _opened_and_checked(data, settings)
    if _plain(image, structure):
        try:
            return _torchvision_decode(data)
        except Exception:  # PIL's decode below says what is wrong, in its words
            log.debug("torchvision could not decode a %s; using PIL", image.format)
    return rgb_pixels(_decode_opened(image, settings))


@dataclass(frozen=True)
class EncodedImage:
    """An image's bytes, opened and checked from its header only: its size is known before
    a pixel is decoded, so a caller can budget it first (``RequestImages``)."""

    data: bytes
    width: int
    height: int
    settings: Settings

    @property
    def pixel_count(self) -> int:
        return self.width * self.height

    def pixels(self) -> np.ndarray:
        """The decoded RGB pixels (HWC uint8), as ``decode_pixels`` gives them."""
        return decode_pixels(self.data, self.settings)


def open_encoded(data: bytes, settings: Settings) -> EncodedImage:
    """The image's header checked (MAX_IMAGE_BYTES, ALLOWED_IMAGE_FORMATS, MAX_IMAGE_PIXELS)
    without decoding it; ``EncodedImage.pixels`` decodes."""
    image = _opened(data, settings)
    width, height = image.size
    image.close()
    return EncodedImage(data, width, height, settings)


# Rows converted at a time by rgb_pixels: a few MB of transient copies at any width.
CONVERT_BAND_ROWS = 256


def rgb_pixels(image: Image.Image) -> np.ndarray:
    """An RGB image's pixels as one HWC uint8 array, band by band: ``np.asarray`` would
    hold two full copies at once (PIL's bytes, then the array), 600 MB at 100 MP."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    for top in range(0, height, CONVERT_BAND_ROWS):
        bottom = min(top + CONVERT_BAND_ROWS, height)
        pixels[top:bottom] = np.asarray(image.crop((0, top, width, bottom)))
    return pixels


_EXIF_ORIENTATION = 0x0112


def _decode_opened(image: Image.Image, settings: Settings) -> Image.Image:
    """An opened, structure-checked image decoded strictly, EXIF-oriented, as RGB."""
    try:
        try:
            _load_strictly(image)
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(_bomb_message(exc, settings.max_image_pixels)) from None
        except Exception:
            raise ImageFormatError(
                f"cannot decode the {image.format} image: truncated or not an image"
            ) from None
        _apply_exif_orientation(image)
        return _to_rgb(image)
    except ImageError:
        image.close()
        raise


def _opened_and_checked(
    data: bytes, settings: Settings
) -> tuple[Image.Image, ImageStructure | None]:
    """``_opened``'s image and ``_checked_structure``'s answer; closed if the check fails."""
    image = _opened(data, settings)
    try:
        return image, _checked_structure(image, data)
    except ImageError:
        image.close()
        raise


def _checked_structure(image: Image.Image, data: bytes) -> ImageStructure | None:
    """``image_checks.check_structure`` for the formats it knows (an MPO is a JPEG with
    more pictures after its first EOI); None for the formats only PIL decodes."""
    if image.format in ("PNG", "JPEG", "MPO"):
        structure = check_structure(data)
        if structure is None:  # PIL found a PNG/JPEG where the magic number says otherwise
            raise ImageFormatError(f"the {image.format} image does not start as one")
        if (structure.width, structure.height) != image.size:
            raise ImageFormatError(f"the {image.format} image's headers disagree on its size")
        return structure
    return None


def _plain(image: Image.Image, structure: ImageStructure | None) -> bool:
    """A JPEG or PNG that torchvision decodes to the same RGB pixels as PIL, safely: an
    8-bit non-interlaced grey/RGB PNG without tRNS, or an 8-bit baseline/progressive grey
    or YCbCr JPEG (no palette, alpha, CMYK, 16-bit or interlace), not EXIF-rotated. Its
    structure is already checked, so it is whole."""
    if structure is None or not structure.torchvision_safe or image.format not in ("JPEG", "PNG"):
        return False
    return image.mode in ("RGB", "L") and _upright(image, structure)


def _upright(image: Image.Image, structure: ImageStructure) -> bool:
    """No EXIF rotation. Pillow's getexif decodes a whole PNG to look for EXIF after its
    image data (as long as the decode itself, and a second copy in memory): skipped when
    the structure walk saw no chunk that can hold EXIF."""
    if not structure.may_have_exif:
        return True
    try:
        return bool(image.getexif().get(_EXIF_ORIENTATION, 1) == 1)
    except Exception:
        return False


def _torchvision_decode(data: bytes) -> np.ndarray:
    import torch
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode

    chw = tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    if chw.dtype != torch.uint8:
        raise ValueError(f"decoded as {chw.dtype}")
    return chw.permute(1, 2, 0).numpy()  # HWC view of the one copy


def _opened(data: bytes, settings: Settings) -> Image.Image:
    """The image opened lazily (header only), within MAX_IMAGE_BYTES, ALLOWED_IMAGE_FORMATS
    and MAX_IMAGE_PIXELS."""
    if len(data) > settings.max_image_bytes:
        raise ImageTooLarge(
            f"the image is {size_text(len(data))}, over MAX_IMAGE_BYTES ({size_text(settings.max_image_bytes)})"
        )
    allowed = [name.upper() for name in settings.allowed_image_formats]
    shown_allowed = ", ".join(allowed) or "none"
    if not data:
        raise ImageFormatError("the image is empty (0 bytes): truncated or not an image")
    _let_pil_open_up_to(settings.max_image_pixels)
    try:
        image = Image.open(io.BytesIO(data), formats=allowed)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(_bomb_message(exc, settings.max_image_pixels)) from None
    except Exception as exc:  # PIL's parsers raise a zoo of exceptions on corrupt headers
        # An allowed format's parser may fail on another format's bytes (an ICO holds a
        # BMP): the magic number still says which format was sent.
        sniffed = _sniff_format(data)
        if sniffed is not None and sniffed not in allowed:
            raise ImageFormatError(
                f"image format {sniffed} is not allowed (ALLOWED_IMAGE_FORMATS: {shown_allowed})"
            ) from None
        if isinstance(exc, UnidentifiedImageError):
            raise ImageFormatError(
                f"cannot decode the image: truncated or not an image "
                f"(ALLOWED_IMAGE_FORMATS: {shown_allowed})"
            ) from None
        raise ImageFormatError("cannot decode the image: truncated or not an image") from None

    try:
        fmt = (image.format or "unknown").upper()
        if fmt not in allowed:  # e.g. an MPO found while opening as JPEG
            raise ImageFormatError(
                f"image format {fmt} is not allowed (ALLOWED_IMAGE_FORMATS: {shown_allowed})"
            )
        width, height = image.size
        if width * height > settings.max_image_pixels:
            raise ImageTooLarge(
                f"the image is {width}x{height} pixels ({_megapixels(width * height)} "
                f"megapixels), over MAX_IMAGE_PIXELS ({settings.max_image_pixels} pixels, "
                f"{_megapixels(settings.max_image_pixels)} megapixels)"
            )
        return image
    except ImageError:
        image.close()
        raise


def _let_pil_open_up_to(max_pixels: int) -> None:
    # PIL refuses images over 2x its own global MAX_IMAGE_PIXELS (about 179 megapixels by
    # default) before we can look at them, which would silently override a larger
    # MAX_IMAGE_PIXELS. Raise PIL's limit to ours (never lower it, never re-enable it when
    # another library disabled it): our own check, from the header, is the one enforced.
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and current < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _load_strictly(image: Image.Image) -> None:
    global _seen_lenient_pil
    if not _seen_lenient_pil and not ImageFile.LOAD_TRUNCATED_IMAGES:
        image.load()
        return
    _seen_lenient_pil = True
    with _truncation_lock:
        saved = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            image.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _apply_exif_orientation(image: Image.Image) -> None:
    # Phones store pictures sideways plus an orientation tag; Label Studio shows them
    # rotated, so boxes must be computed on the rotated image. A broken EXIF block is not
    # worth refusing the image for.
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as exc:
        log.debug("ignoring an unreadable EXIF orientation: %s", exc)


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    try:
        if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
            mode == "P" and "transparency" in image.info
        ):
            # Label Studio shows transparent areas on a light background: do the same.
            rgba = image.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        if mode.startswith("I") or mode == "F":
            # 16-bit or float greyscale: scale into 0-255 instead of clipping to white.
            grey = image.convert("F")
            extrema = grey.getextrema()
            high = float(extrema[1]) if isinstance(extrema[1], int | float) else 255.0
            if high > 255:
                grey = grey.point(lambda value: value * (255.0 / high))
            return grey.convert("L").convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError):
        raise ImageFormatError(f"cannot convert an image of mode {mode} to RGB") from None


def _sniff_format(data: bytes) -> str | None:
    head = data[:16]
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"mif1", b"msf1", b"hevc"):
            return "HEIF"
    stripped = data[:256].lstrip()
    for magic, name in _MAGIC:
        if head.startswith(magic) or (name == "SVG" and stripped.startswith(magic)):
            return name
    return None


def _bomb_message(exc: Exception, max_pixels: int) -> str:
    # PIL's own guard fired from the header: its message carries the pixel count only.
    match = re.search(r"\((\d+) pixels\)", str(exc))
    size = (
        f"{int(match.group(1))} pixels ({_megapixels(int(match.group(1)))} megapixels)"
        if match
        else "too many pixels"
    )
    return (
        f"the image has {size}, over MAX_IMAGE_PIXELS ({max_pixels} pixels, "
        f"{_megapixels(max_pixels)} megapixels)"
    )


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.3g}"


def size_text(n_bytes: int) -> str:
    if n_bytes >= 2**20:
        return f"{n_bytes / 2**20:.1f} MiB"
    if n_bytes >= 2**10:
        return f"{n_bytes / 2**10:.1f} KiB"
    return f"{n_bytes} bytes"
