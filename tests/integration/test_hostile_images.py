"""A corpus of hostile and awkward images, served over HTTP and taken through
the worker's own path (fetch, then decode): each bad one is refused with a
reason naming the parameter; each awkward but valid one is read correctly."""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import Callable, Iterator

import pytest
from PIL import Image

from retouch.errors import InvalidInputError
from retouch.fetch import ImageFetcher
from retouch.images import decode_image
from tests.support import ImageHost, image_bytes, png_bytes

PARAM = "image_urls[2]"
MB = 1024 * 1024


def noise(size: tuple[int, int], fmt: str, **options: object) -> bytes:
    return image_bytes(Image.effect_noise(size, 64).convert("RGB"), fmt, **options)


def png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload)
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
        + chunk(b"IEND", b"")
    )


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (400, 400), (i * 60, 0, 0)) for i in range(3)]
    return image_bytes(frames[0], fmt, save_all=True, append_images=frames[1:])


SVG = (
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="800" height="800">'
    b'<image href="http://169.254.169.254/latest/meta-data/"/></svg>'
)
# GIF header + JavaScript: valid for some parsers, an image to none we accept.
POLYGLOT = b"GIF89a/*\x01\x01\x00\x00\xff\x00,*/=alert(1);" + b"\x00" * 64

HOSTILE: list[tuple[str, Callable[[], bytes], str]] = [
    ("zero bytes", lambda: b"", "empty"),
    ("html page", lambda: b"<!doctype html><title>Login</title><form></form>", "not an image"),
    ("svg with an inward link", lambda: SVG, "not an image"),
    ("gif/js polyglot", lambda: POLYGLOT, "not an image"),
    ("json error body", lambda: b'{"error": "not found"}', "not an image"),
    (
        "gif (unsupported format)",
        lambda: image_bytes(Image.new("RGB", (400, 400)), "GIF"),
        "supported format",
    ),
    ("animated gif", lambda: animated("GIF"), "supported format"),
    ("animated webp", lambda: animated("WEBP"), "animated"),
    ("truncated png", lambda: noise((600, 600), "PNG")[:20_000], "truncated or corrupt"),
    ("truncated jpeg", lambda: noise((600, 600), "JPEG")[:5_000], "truncated or corrupt"),
    ("png bomb 100000x100000", lambda: png_declaring(100_000, 100_000), "10,000,000,000 pixels"),
    ("png declaring 30000x30000", lambda: png_declaring(30_000, 30_000), "decompression bomb"),
    ("too small 383x383", lambda: png_bytes((383, 383)), "383x383"),
    ("too narrow 3000x100", lambda: png_bytes((3000, 100)), "3000x100"),
    ("too large 3073x400", lambda: png_bytes((3073, 400)), "3073x400"),
    ("tiny 1x1 png", lambda: png_bytes((1, 1)), "1x1"),
    ("random bytes", lambda: bytes(range(256)) * 40, "not an image"),
    (
        "png signature then garbage",
        lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 500,
        "PNG file is truncated",
    ),
    ("jpeg header only", lambda: noise((500, 500), "JPEG")[:600], "JPEG file is truncated"),
    ("bmp declaring 50000x50000", lambda: bmp_declaring(50_000, 50_000), "decompression bomb"),
]


def bmp_declaring(width: int, height: int) -> bytes:
    header = struct.pack("<2sIHHI", b"BM", 54, 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return header + info + b"\x00" * 64


@pytest.fixture
def fetcher() -> Iterator[ImageFetcher]:
    with ImageFetcher(allow_private_networks=True, allowed_ports=None, timeout_seconds=3) as f:
        yield f


def take(fetcher: ImageFetcher, url: str) -> Image.Image:
    return decode_image(fetcher.fetch(url, PARAM), PARAM)


def test_the_corpus_is_large_enough() -> None:
    assert len(HOSTILE) >= 20


@pytest.mark.parametrize(("name", "make", "reason"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_image_is_refused_naming_the_parameter(
    fetcher: ImageFetcher, image_host: ImageHost, name: str, make: Callable[[], bytes], reason: str
) -> None:
    url = image_host.add("/image.png", make(), **{"Content-Type": "image/png"})
    with pytest.raises(InvalidInputError) as info:
        take(fetcher, url)
    assert info.value.param == PARAM
    assert reason in info.value.message, info.value.message


def test_over_10_mb_is_refused_by_its_declared_length(
    fetcher: ImageFetcher, image_host: ImageHost
) -> None:
    url = image_host.add("/big.png", b"\x00" * (10 * MB + 1))
    with pytest.raises(InvalidInputError, match="larger than 10 MB"):
        take(fetcher, url)


def test_an_endless_body_is_cut_off_at_10_mb(fetcher: ImageFetcher, image_host: ImageHost) -> None:
    sent: list[int] = []

    def endless() -> Iterator[bytes]:
        for count in itertools.count():
            sent.append(count)
            yield b"\x00" * 65536

    url = image_host.stream("/endless.png", endless)
    with pytest.raises(InvalidInputError, match="larger than 10 MB"):
        take(fetcher, url)
    assert len(sent) < 10 * MB // 65536 + 50


def test_a_slow_drip_body_is_cut_off_at_the_time_limit(
    fetcher: ImageFetcher, image_host: ImageHost
) -> None:
    url = image_host.stream("/drip.png", lambda: itertools.repeat(b"\x89", 1000), drip_seconds=0.5)
    with pytest.raises(InvalidInputError, match=r"took longer than 3 s|timed out"):
        take(fetcher, url)


@pytest.mark.parametrize(
    ("name", "make", "mode_size"),
    [
        ("jpeg named .png", lambda: noise((500, 400), "JPEG"), (500, 400)),
        (
            "cmyk jpeg",
            lambda: image_bytes(Image.new("CMYK", (400, 400), (0, 255, 255, 0)), "JPEG"),
            (400, 400),
        ),
        (
            "16-bit png",
            lambda: image_bytes(Image.new("I;16", (400, 450), 30000), "PNG"),
            (400, 450),
        ),
        (
            "palette png with transparency",
            lambda: image_bytes(Image.new("P", (400, 400)), "PNG", transparency=0),
            (400, 400),
        ),
        ("tiff", lambda: noise((400, 400), "TIFF"), (400, 400)),
        ("bmp", lambda: noise((400, 400), "BMP"), (400, 400)),
        ("webp", lambda: noise((400, 400), "WEBP"), (400, 400)),
        ("3072x3072 png", lambda: png_bytes((3072, 3072)), (3072, 3072)),
    ],
)
def test_awkward_but_valid_images_are_read(
    fetcher: ImageFetcher,
    image_host: ImageHost,
    name: str,
    make: Callable[[], bytes],
    mode_size: tuple[int, int],
) -> None:
    url = image_host.add("/image.png", make(), **{"Content-Type": "application/octet-stream"})
    image = take(fetcher, url)
    assert (image.mode, image.size) == ("RGB", mode_size)


def test_an_exif_rotated_photo_is_turned_upright(
    fetcher: ImageFetcher, image_host: ImageHost
) -> None:
    photo = Image.new("RGB", (640, 480), (255, 0, 0))
    photo.paste((0, 0, 255), (0, 0, 64, 48))  # a blue corner, top left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    url = image_host.add("/photo.jpg", image_bytes(photo, "JPEG", exif=exif, quality=95))
    upright = take(fetcher, url)
    assert upright.size == (480, 640)
    red, _green, blue = upright.getpixel((470, 10))  # the corner is now top right
    assert blue > 200 and red < 60
