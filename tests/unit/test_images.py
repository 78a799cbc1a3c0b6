"""Input images: sniffed, bounded, decoded safely, turned upright."""

from __future__ import annotations

import struct
import zlib

import pytest
from PIL import Image

from retouch.errors import InvalidInputError
from retouch.images import decode_image, encode_png
from tests.support import image_bytes, png_bytes

PARAM = "image_urls[0]"


def rejected(data: bytes) -> str:
    with pytest.raises(InvalidInputError) as info:
        decode_image(data, PARAM)
    assert info.value.param == PARAM
    return info.value.message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "WEBP", "TIFF"])
def test_supported_formats_decode_to_rgb(fmt: str) -> None:
    image = decode_image(image_bytes(Image.new("RGB", (400, 500), (1, 2, 3)), fmt), PARAM)
    assert (image.mode, image.size) == ("RGB", (400, 500))


@pytest.mark.parametrize("size", [(384, 384), (3072, 384), (384, 3072)])
def test_sides_at_the_limits_are_accepted(size: tuple[int, int]) -> None:
    assert decode_image(png_bytes(size), PARAM).size == size


@pytest.mark.parametrize("size", [(383, 500), (500, 383), (3073, 500), (500, 3073)])
def test_sides_outside_the_limits_are_refused(size: tuple[int, int]) -> None:
    message = rejected(png_bytes(size))
    assert f"{size[0]}x{size[1]}" in message and "384-3072" in message


def test_empty_download() -> None:
    assert "empty" in rejected(b"")


def test_html_page_is_not_an_image() -> None:
    assert "not an image" in rejected(b"<!doctype html><html><body>hi</body></html>")


def test_gif_is_not_a_supported_format() -> None:
    gif = image_bytes(Image.new("RGB", (400, 400)), "GIF")
    assert "supported format" in rejected(gif)


def test_truncated_png() -> None:
    data = image_bytes(Image.effect_noise((512, 512), 64).convert("RGB"), "PNG")
    assert "truncated or corrupt" in rejected(data[: len(data) // 2])


def test_truncated_jpeg() -> None:
    data = image_bytes(Image.effect_noise((512, 512), 64).convert("RGB"), "JPEG")
    assert "truncated or corrupt" in rejected(data[: len(data) // 2])


def tiff_with_a_page_without_dimensions() -> bytes:
    """A valid 400x400 TIFF whose chain of pages leads to a second one with no width
    or height: counting its pages makes Pillow raise TypeError, not OSError."""
    data = bytearray(image_bytes(Image.new("RGB", (400, 400), (1, 2, 3)), "TIFF"))
    first = struct.unpack("<I", data[4:8])[0]
    entries = struct.unpack("<H", data[first : first + 2])[0]
    next_page = first + 2 + 12 * entries
    data[next_page : next_page + 4] = struct.pack("<I", len(data))
    software = struct.pack("<HHI4s", 305, 2, 4, b"ab\0\0")  # one tag, no dimensions
    return bytes(data + struct.pack("<H", 1) + software + struct.pack("<I", 0))


def test_whatever_a_parser_raises_on_damaged_bytes_is_a_named_refusal() -> None:
    message = rejected(tiff_with_a_page_without_dimensions())
    assert "TIFF image is truncated or corrupt" in message and "TypeError" in message


def test_decompression_bomb_is_refused_before_decoding() -> None:
    # A PNG header declaring 100000x100000 pixels, with almost no data.
    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload)
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )
    message = rejected(bomb)
    assert "100000x100000" in message or "decompression bomb" in message


def test_animated_webp_is_refused() -> None:
    frames = [Image.new("RGB", (400, 400), (i * 60, 0, 0)) for i in range(3)]
    data = image_bytes(frames[0], "WEBP", save_all=True, append_images=frames[1:])
    assert "animated" in rejected(data)


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (600, 400), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode_image(image_bytes(image, "JPEG", exif=exif), PARAM)
    assert decoded.size == (400, 600)


def test_transparent_png_is_flattened_on_white() -> None:
    image = Image.new("RGBA", (400, 400), (0, 0, 0, 0))
    decoded = decode_image(image_bytes(image, "PNG"), PARAM)
    assert decoded.mode == "RGB" and decoded.getpixel((10, 10)) == (255, 255, 255)


def test_cmyk_jpeg_and_16_bit_png_become_rgb() -> None:
    cmyk = decode_image(image_bytes(Image.new("CMYK", (400, 400), (0, 255, 255, 0)), "JPEG"), PARAM)
    deep = decode_image(image_bytes(Image.new("I;16", (400, 400), 65535), "PNG"), PARAM)
    assert cmyk.mode == deep.mode == "RGB"
    assert cmyk.getpixel((5, 5))[0] > 200  # red stays red
    assert deep.getpixel((5, 5)) == (255, 255, 255)


def test_png_extension_with_jpeg_content_is_sniffed() -> None:
    jpeg = image_bytes(Image.new("RGB", (400, 400)), "JPEG")
    assert decode_image(jpeg, PARAM).size == (400, 400)


def test_encode_png_round_trips() -> None:
    image = Image.new("RGB", (64, 32), (9, 8, 7))
    assert Image.open(__import__("io").BytesIO(encode_png(image))).getpixel((0, 0)) == (9, 8, 7)
