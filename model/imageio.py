"""The one image decoder: training, evaluation, the Gradio UI, the REST API and batch prediction.

`load_image` turns bytes, a path, a file object, a datasets `{"path", "bytes"}` value or an
already opened `PIL.Image` into an 8-bit RGB `PIL.Image`, or refuses it with an
`InvalidImageError` whose message says what is wrong and what to send instead. Training data
goes through the same limits as uploads (they are far above any dermoscopy image), so a file
the app refuses is also one training skips, and every pixel rule below holds everywhere.

Behaviour per input kind:
- empty, truncated or non-image files (text, HTML, SVG, PDF, ...): refused;
- files over `max_bytes` or images over `max_pixels` (decompression bombs): refused before the
  pixel data is decoded;
- only raster formats that Pillow decodes without external programs are opened (JPEG, PNG,
  GIF, BMP, TIFF, WebP): never EPS/PS (Ghostscript) or other exotic decoders;
- animated images (GIF, APNG, WebP, multi-page TIFF): the first frame is used;
- with `max_side`, big images are shrunk in their decoded mode first (JPEG: DCT-domain `draft`;
  others: Pillow `reduce`, box or nearest resampling), so conversions and float arithmetic run at
  most at twice `max_side`: a 7000x7000 16-bit or RGBA PNG costs its decoded buffer (<= 4 bytes a
  pixel, <= 200 MB at `MAX_PIXELS`), not gigabytes of float copies;
- EXIF orientation is applied, so a portrait photo stays portrait;
- 16/32-bit greyscale (`I;16`, `I`) is rescaled to 8 bits, float (`F`) is clipped to [0, 255];
- CMYK, palette, greyscale and YCbCr images are converted to RGB;
- transparency (RGBA, LA, palette with a transparent colour) is composited on white.
"""

from __future__ import annotations

import io
import logging
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

logger = logging.getLogger(__name__)

MAX_BYTES = 20 * 2**20  # 20 MiB
MAX_PIXELS = 50_000_000
MIN_SIDE = 8
# Formats Pillow decodes in-process; EPS/PS would shell out to Ghostscript.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")

_TEXT_MARKERS = (b"<svg", b"<html", b"<!doctype", b"<?xml", b"<head", b"<body", b"<script")


ImageSource = bytes | bytearray | str | os.PathLike | BinaryIO | Mapping | Image.Image


class InvalidImageError(ValueError):
    """The input cannot be used as an image; the message says why and what to send instead."""


def format_bytes(n: int) -> str:
    """A byte count as people read limits: "20 MiB" (binary), "1 MB" (decimal) or "1,234 bytes"."""
    if n >= 2**20 and n % 2**20 == 0:
        return f"{n // 2**20} MiB"
    if n >= 10**6 and n % 10**6 == 0:
        return f"{n // 10**6} MB"
    return f"{n:,} bytes"


def _too_big(size: int | None, max_bytes: int) -> InvalidImageError:
    # The file's size in the limit's own unit, so "20.3 MiB; the limit is 20 MiB" never reads "21 MB".
    unit, scale = ("MiB", 2**20) if format_bytes(max_bytes).endswith("MiB") else ("MB", 10**6)
    actual = f"File is {size / scale:.1f} {unit}" if size is not None else "File is larger than allowed"
    return InvalidImageError(
        f"{actual}; the limit is {format_bytes(max_bytes)}. "
        "Send a smaller (e.g. JPEG-compressed or downscaled) image."
    )


def _read_bytes(source: bytes | bytearray | str | os.PathLike | BinaryIO, max_bytes: int) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InvalidImageError(f"No such image file: {path.name}")
        size = path.stat().st_size
        if size > max_bytes:
            raise _too_big(size, max_bytes)
        data = path.read_bytes()
    elif hasattr(source, "read"):
        data = source.read(max_bytes + 1)
    else:
        raise InvalidImageError(f"Expected image bytes or a file path, got {type(source).__name__}.")
    if len(data) > max_bytes:
        raise _too_big(len(data) if isinstance(source, (bytes, bytearray)) else None, max_bytes)
    if not data.strip():
        raise InvalidImageError("The file is empty (0 bytes of image data). Send a JPEG or PNG image.")
    return data


def _looks_like_markup(data: bytes) -> bool:
    head = data[:1024].lstrip().lower()
    return head.startswith(b"<") or any(marker in head for marker in _TEXT_MARKERS)


# EXIF orientation -> the transpose that displays the image upright (as `ImageOps.exif_transpose`).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except (OSError, ValueError, TypeError, SyntaxError):  # unreadable EXIF: show the image as stored
        return 1


def _to_8bit_grey(im: Image.Image, high: float) -> Image.Image:
    """16/32-bit integer or float greyscale -> "L": 16-bit data rescaled, floats clipped. `high` is
    the whole image's maximum, so every band of one image follows the same rule."""
    arr = np.asarray(im)
    if im.mode == "F":
        arr = arr.astype(np.float64)
        if high <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.rint(np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)), 0, 255)
    elif im.mode.startswith("I;16") or high > 255:
        # 16-bit data (explicit I;16, or 32-bit ints holding 16-bit values) -> 8 bits:
        # round(v / 257) in integers, exact (v / 257 is never a tie).
        arr = (np.clip(arr.astype(np.int32), 0, 65535) + 128) // 257
    else:
        arr = np.clip(arr, 0, 255)
    return Image.fromarray(arr.astype(np.uint8), mode="L")


def _to_rgb(im: Image.Image, high: float | None = None) -> Image.Image:
    """A decoded single frame (or a band of one) -> 8-bit RGB: 16/32-bit and float greyscale
    rescaled (`high`: the frame's maximum), alpha composited on white."""
    mode = im.mode
    if mode.startswith("I") or mode == "F":
        im = _to_8bit_grey(im, im.getextrema()[1] if high is None else high)
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        im.mode == "P" and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba).convert("RGB")
    elif im.mode != "RGB":
        try:
            im = im.convert("RGB")
        except (ValueError, OSError) as err:
            logger.info("Cannot convert mode %s to RGB: %r", mode, err)
            raise InvalidImageError(f"Cannot convert colour mode {mode!r} to RGB. Send an RGB JPEG or PNG.") from err
    return im


def _thumbnail_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The size `Image.thumbnail((max_side, max_side))` gives a width x height image."""
    if width >= height:
        aspect = width / height
        side = max(min(math.floor(max_side / aspect), math.ceil(max_side / aspect),
                       key=lambda n: abs(aspect - max_side / n) if n else math.inf), 1)
        return max_side, side
    aspect = width / height
    side = max(min(math.floor(max_side * aspect), math.ceil(max_side * aspect),
                   key=lambda n: abs(aspect - n / max_side)), 1)
    return side, max_side


def _to_rgb_small(im: Image.Image, max_side: int, band_rows: int = 32) -> Image.Image:
    """A non-RGB frame -> RGB of at most `max_side`, with the pixels of converting the whole frame and
    then `thumbnail` (up to rounding), in bounded memory: converted in bands of the decoded image,
    each band shrunk by an integer factor (`reduce`) that keeps the longer side >= 2 x `max_side`
    (as `thumbnail`'s own reducing gap), then one LANCZOS step. Memory: the decoded buffer plus a
    few band-sized copies, never a converted or float copy of the whole image."""
    factor = max(1, max(im.size) // (2 * max_side))
    high = im.getextrema()[1] if im.mode.startswith("I") or im.mode == "F" else None
    out = Image.new("RGB", (-(-im.width // factor), -(-im.height // factor)))  # ceil, as `reduce`
    step = band_rows * factor
    for top in range(0, im.height, step):
        band = _to_rgb(im.crop((0, top, im.width, min(top + step, im.height))), high)
        out.paste(band.reduce(factor) if factor > 1 else band, (0, top // factor))
    if max(im.size) <= max_side:
        return out
    # The box keeps the sampling grid of the whole image where the last block was partial.
    box = (0.0, 0.0, im.width / factor, im.height / factor)
    return out.resize(_thumbnail_size(*im.size, max_side), Image.Resampling.LANCZOS, box=box)


def _check_size(width: int, height: int, max_pixels: int, min_side: int) -> None:
    if width * height > max_pixels:
        raise InvalidImageError(
            f"Image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,} "
            "(decompression-bomb protection). Send a downscaled image."
        )
    if min(width, height) < min_side:
        raise InvalidImageError(
            f"Image is {width}x{height} pixels; both sides must be at least {min_side} pixels."
        )


def _finish(im: Image.Image, max_side: int | None) -> Image.Image:
    """Decoded frame -> RGB of at most `max_side`: non-RGB modes converted band by band and shrunk
    on the way (RGB is shrunk by `thumbnail`, which reduces first the same way), resampled, then
    oriented upright (on the small image: a transpose copies)."""
    orientation = _orientation(im)
    if max_side is not None and im.mode != "RGB":
        rgb = _to_rgb_small(im, max_side)
    else:
        rgb = _to_rgb(im)
        if max_side is not None and max(rgb.size) > max_side:
            rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    if orientation in _ORIENTATION:
        rgb = rgb.transpose(_ORIENTATION[orientation])
    return rgb


def load_image(
    source: ImageSource,
    max_bytes: int = MAX_BYTES,
    max_pixels: int = MAX_PIXELS,
    min_side: int = MIN_SIDE,
    max_side: int | None = None,
) -> Image.Image:
    """Decode untrusted image data into an 8-bit RGB image.

    Args:
        source: raw bytes, a path, a binary file object, a datasets Image value
            `{"bytes": ..., "path": ...}` (bytes first), or an opened `PIL.Image` (size limits and
            the pixel rules apply; its bytes were read by whoever opened it).
        max_bytes: largest accepted file size in bytes (default 20 MiB).
        max_pixels: largest accepted width * height, checked from the header before decoding
            (default 50 megapixels), so decompression bombs are refused cheaply.
        min_side: smallest accepted width and height in pixels.
        max_side: if set, larger images are downscaled (aspect kept) so neither side exceeds it;
            JPEGs are then decoded at reduced resolution, other formats shrunk in their decoded
            mode before any conversion (memory: the decoded buffer plus images of <= 2 x max_side).

    Returns:
        A fully loaded `PIL.Image.Image` in mode "RGB", EXIF orientation applied; for animated
        images the first frame.

    Raises:
        InvalidImageError: empty, truncated, non-image, markup (HTML/SVG), too large, or an
            unsupported format; the message says what to send instead.
    """
    if isinstance(source, Image.Image):
        _check_size(*source.size, max_pixels, min_side)
        return _finish(source, max_side)
    if isinstance(source, Mapping):
        source = source.get("bytes") or source.get("path") or b""
    data = _read_bytes(source, max_bytes)
    if _looks_like_markup(data):
        raise InvalidImageError(
            "This is a text/markup file (HTML, SVG or XML), not a raster image. "
            "Send a JPEG or PNG photograph."
        )
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below replaces Pillow's bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    except Image.DecompressionBombError as err:
        # Pillow's own message quotes Pillow's limit, not ours: log it, say ours.
        logger.info("Decompression bomb refused: %s", err)
        raise InvalidImageError(
            f"Image dimensions are far above the limit of {max_pixels:,} pixels (possible decompression bomb). "
            "Send a downscaled image."
        ) from err
    except UnidentifiedImageError as err:
        raise InvalidImageError(
            "Not a recognised image file. Supported formats: JPEG, PNG, GIF, BMP, TIFF, WebP."
        ) from err
    except (OSError, ValueError, SyntaxError) as err:
        logger.info("Unreadable image header: %r", err)
        raise InvalidImageError(
            "Cannot read the image header: the file may be corrupt. Re-export it as JPEG or PNG."
        ) from err

    width, height = im.size
    _check_size(width, height, max_pixels, min_side)
    if getattr(im, "n_frames", 1) > 1:
        logger.info("Multi-frame %s image: using the first of %d frames.", im.format, im.n_frames)
        im.seek(0)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Another module relaxed Pillow globally; truncated uploads must still be refused here.
        logger.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; truncation checks are weaker.")
    try:
        if max_side is not None and im.format == "JPEG" and max(width, height) > 2 * max_side:
            im.draft(None, (max_side, max_side))  # DCT-domain downscale by a power of two
        im.load()
        rgb = _finish(im, max_side)
    except InvalidImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        logger.info("Undecodable image data: %r", err)
        raise InvalidImageError(
            "The image data is truncated or corrupt. Re-export or re-upload the file."
        ) from err
    return rgb
