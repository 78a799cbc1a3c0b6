"""Decoding and validating input images, and encoding results.

The format is sniffed from the bytes (never the extension or Content-Type),
only the seed's formats are decoded, and the size is checked from the header
before any pixel is decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import io
import re
import warnings

from PIL import Image, ImageOps

from retouch.errors import InvalidInputError

ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF")
MIN_SIDE = 384
MAX_SIDE = 3072
_FORMAT_NAMES = "jpg, png, bmp, webp or tiff"


def decode_image(data: bytes, param: str) -> Image.Image:
    """An RGB image, upright per its EXIF orientation, or `InvalidInputError` naming `param`."""
    if not data:
        raise InvalidInputError("the image is empty (0 bytes were downloaded)", param=param)
    with warnings.catch_warnings():
        # Pillow warns about damaged metadata ("Corrupt EXIF data") and reads on: so do
        # we, and the pixels decide. Bombs are errors (below), never warnings.
        warnings.simplefilter("ignore", UserWarning)
        return _decode(data, param)


def _decode(data: bytes, param: str) -> Image.Image:
    image = _open(data, param)
    width, height = image.size
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise InvalidInputError(
            f"the image is {width}x{height}; width and height must be within "
            f"{MIN_SIDE}-{MAX_SIDE} pixels",
            param=param,
        )
    try:
        return _pixels(image, param)
    except (InvalidInputError, MemoryError):
        raise
    except Exception as exc:
        # Pillow's parsers meet hostile bytes with whatever they raise (TypeError,
        # KeyError, struct.error…): all of it is a bad image, not a server error.
        raise InvalidInputError(
            f"the {image.format} image is truncated or corrupt ({type(exc).__name__}: {exc})",
            param=param,
        ) from None


def _pixels(image: Image.Image, param: str) -> Image.Image:
    if getattr(image, "n_frames", 1) > 1:
        raise InvalidInputError(
            "animated images are not supported; send a single still image", param=param
        )
    image.load()
    upright = ImageOps.exif_transpose(image)
    return _to_rgb(upright)


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _open(data: bytes, param: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        declared = f"{int(pixels[1]):,} pixels" if pixels else "too many pixels"
        raise InvalidInputError(
            f"the image declares {declared} (a decompression bomb?); "
            f"width and height must be within {MIN_SIDE}-{MAX_SIDE} pixels",
            param=param,
        ) from None
    except MemoryError:
        raise
    except Exception:  # UnidentifiedImageError, or whatever a parser raised on these bytes
        claimed = _claimed_format(data)
        if claimed:
            raise InvalidInputError(
                f"the {claimed} file is truncated or corrupt: its header could not be read",
                param=param,
            ) from None
        raise InvalidInputError(
            f"the content is not an image in a supported format ({_FORMAT_NAMES}); "
            f"it starts with {data[:16]!r}",
            param=param,
        ) from None


_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def sniff_format(data: bytes) -> str | None:
    """The supported format the first bytes announce (JPEG, PNG, BMP, WEBP, TIFF)."""
    if data[:2] == b"BM":
        return "BMP"
    return _claimed_format(data)


def _claimed_format(data: bytes) -> str | None:
    """The supported format a file's first bytes claim, if any."""
    for signature, name in _SIGNATURES:
        if data.startswith(signature):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits before converting.
        return image.point(lambda value: value / 256).convert("L").convert("RGB")
    return image.convert("RGB")
