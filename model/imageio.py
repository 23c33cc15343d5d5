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
- EXIF orientation is applied (`ImageOps.exif_transpose`), so a portrait photo stays portrait;
- 16/32-bit greyscale (`I;16`, `I`) is rescaled to 8 bits, float (`F`) is clipped to [0, 255];
- CMYK, palette, greyscale and YCbCr images are converted to RGB;
- transparency (RGBA, LA, palette with a transparent colour) is composited on white.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

MAX_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 50_000_000
MIN_SIDE = 8
# Formats Pillow decodes in-process; EPS/PS would shell out to Ghostscript.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")

_TEXT_MARKERS = (b"<svg", b"<html", b"<!doctype", b"<?xml", b"<head", b"<body", b"<script")


ImageSource = bytes | bytearray | str | os.PathLike | BinaryIO | Mapping | Image.Image


class InvalidImageError(ValueError):
    """The input cannot be used as an image; the message says why and what to send instead."""


def _read_bytes(source: bytes | bytearray | str | os.PathLike | BinaryIO, max_bytes: int) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InvalidImageError(f"No such image file: {path.name}")
        size = path.stat().st_size
        if size > max_bytes:
            raise InvalidImageError(
                f"File is {size / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.0f} MB. "
                "Send a smaller (e.g. JPEG-compressed or downscaled) image."
            )
        data = path.read_bytes()
    elif hasattr(source, "read"):
        data = source.read(max_bytes + 1)
    else:
        raise InvalidImageError(f"Expected image bytes or a file path, got {type(source).__name__}.")
    if len(data) > max_bytes:
        raise InvalidImageError(
            f"File is larger than allowed; the limit is {max_bytes / 1e6:.0f} MB. "
            "Send a smaller (e.g. JPEG-compressed or downscaled) image."
        )
    if not data.strip():
        raise InvalidImageError("The file is empty (0 bytes of image data). Send a JPEG or PNG image.")
    return data


def _looks_like_markup(data: bytes) -> bool:
    head = data[:1024].lstrip().lower()
    return head.startswith(b"<") or any(marker in head for marker in _TEXT_MARKERS)


def _to_rgb(im: Image.Image) -> Image.Image:
    """A decoded single frame -> 8-bit RGB: EXIF orientation applied, 16/32-bit and float greyscale
    rescaled, alpha composited on white."""
    im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        # 16-bit data (explicit I;16, or 32-bit ints holding 16-bit values) -> 8 bits.
        if mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0
        im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    elif mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if np.isfinite(arr).all() and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
        im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")

    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        im.mode == "P" and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode != "RGB":
        try:
            im = im.convert("RGB")
        except (ValueError, OSError) as err:
            raise InvalidImageError(
                f"Cannot convert colour mode {mode!r} to RGB ({err}). Send an RGB JPEG or PNG."
            ) from err
    return im


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
    rgb = _to_rgb(im)
    if max_side is not None and max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
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
        max_bytes: largest accepted file size in bytes (default 20 MB).
        max_pixels: largest accepted width * height, checked from the header before decoding
            (default 50 megapixels), so decompression bombs are refused cheaply.
        min_side: smallest accepted width and height in pixels.
        max_side: if set, larger images are downscaled (aspect kept) so neither side exceeds it;
            JPEGs are then decoded at reduced resolution (faster, less memory).

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
        raise InvalidImageError(
            f"Image dimensions are far too large (possible decompression bomb): {err}. "
            f"The limit is {max_pixels:,} pixels."
        ) from err
    except UnidentifiedImageError as err:
        raise InvalidImageError(
            "Not a recognised image file. Supported formats: JPEG, PNG, GIF, BMP, TIFF, WebP."
        ) from err
    except (OSError, ValueError, SyntaxError) as err:
        raise InvalidImageError(f"Cannot read image header ({err}). The file may be corrupt.") from err

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
        raise InvalidImageError(
            f"The image data is truncated or corrupt ({err}). Re-export or re-upload the file."
        ) from err
    return rgb
