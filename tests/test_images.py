"""Radiograph decoding across PNG modes, normalisation, and rejection of bad files."""

import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline import images
from pipeline.images import IMAGENET_MEAN, IMAGENET_STD, ImageDecodeError, preprocess_radiograph, read_radiograph

LIMIT = 10_000_000


def _gradient(size=(40, 30)) -> np.ndarray:
    width, height = size
    return np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16"])
def test_modes_decode_to_same_gray(tmp_path, mode):
    gray = _gradient()
    path = tmp_path / f"image-{mode.replace(';', '')}.png"
    if mode == "I;16":
        Image.fromarray(gray.astype(np.uint16) * 257).save(path)
    else:
        Image.fromarray(gray, "L").convert(mode).save(path)
    decoded = read_radiograph(path, LIMIT)
    assert decoded.shape == (30, 40)
    assert decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, gray / 255.0, atol=1 / 255)


def test_preprocess_shape_and_normalisation(tmp_path):
    path = tmp_path / "white.png"
    Image.fromarray(np.full((50, 70), 255, np.uint8)).save(path)
    pixels = preprocess_radiograph(path, 32, LIMIT)
    assert pixels.shape == (32, 32, 3)
    np.testing.assert_allclose(pixels[0, 0], (1.0 - IMAGENET_MEAN) / IMAGENET_STD, rtol=1e-5)


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "not a readable image"), (b"hello, not an image", "not a readable image")],
)
def test_bad_files_raise(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=reason):
        read_radiograph(path, LIMIT)


def test_truncated_png_raises(tmp_path):
    path = tmp_path / "truncated.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ImageDecodeError, match="truncated.png"):
        read_radiograph(path, LIMIT)


def test_pixel_limit_rejects_large_image(tmp_path):
    path = tmp_path / "large.png"
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(path)
    with pytest.raises(ImageDecodeError, match="featurize.max_pixels"):
        read_radiograph(path, 5_000)


def test_pixel_limit_error_without_pillow_warning(tmp_path, monkeypatch):
    path = tmp_path / "large-rgb.png"
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6_000)  # Pillow warns between 6,000 and 12,000 pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageDecodeError, match="100x100 pixels exceeds the limit of 5000"):
            read_radiograph(path, 5_000)


def test_jpeg_named_png_decodes(tmp_path):
    path = tmp_path / "really-a-jpeg.png"
    Image.fromarray(_gradient(), "L").save(path, format="JPEG", quality=95)
    assert read_radiograph(path, LIMIT).shape == (30, 40)


def _png_header_only(path, width, height):
    """Write a PNG whose header claims width x height gray pixels but whose pixel data is cut short."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(1000))))


def test_palette_transparency_composited_on_black(tmp_path):
    path = tmp_path / "palette.png"
    image = Image.new("P", (4, 2))
    image.putpalette([200, 200, 200, 100, 100, 100] + [0, 0, 0] * 254)
    image.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    image.save(path, transparency=0)
    decoded = read_radiograph(path, LIMIT)
    expected = np.array([[0, 100, 0, 100], [100, 100, 0, 0]], np.float32) / 255.0
    np.testing.assert_allclose(decoded, expected, atol=1e-6)


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_partial_alpha_scales_gray(tmp_path, mode):
    path = tmp_path / f"alpha-{mode}.png"
    gray = Image.fromarray(np.full((3, 5), 200, np.uint8), "L")
    alpha = Image.fromarray(np.full((3, 5), 128, np.uint8), "L")
    channels = [gray, alpha] if mode == "LA" else [gray, gray, gray, alpha]
    Image.merge(mode, channels).save(path)
    decoded = read_radiograph(path, LIMIT)
    np.testing.assert_allclose(decoded, np.full((3, 5), 200 * 128 / 255 / 255), atol=1 / 255)


def test_sixteen_bit_full_range(tmp_path):
    path = tmp_path / "sixteen.png"
    Image.fromarray(np.array([[0, 257, 65535]], np.uint16)).save(path)
    decoded = read_radiograph(path, LIMIT)
    np.testing.assert_allclose(decoded, [[0.0, 257 / 65535, 1.0]], atol=1e-6)


def test_one_pixel_image(tmp_path):
    path = tmp_path / "one.png"
    Image.fromarray(np.array([[255]], np.uint8)).save(path)
    assert read_radiograph(path, LIMIT).shape == (1, 1)
    pixels = preprocess_radiograph(path, 32, LIMIT)
    assert pixels.shape == (32, 32, 3)
    np.testing.assert_allclose(pixels, np.broadcast_to((1.0 - IMAGENET_MEAN) / IMAGENET_STD, (32, 32, 3)), rtol=1e-5)


def test_bomb_rejected_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (10_000, 8_000)).save(path)
    assert path.stat().st_size < 100_000
    started = time.perf_counter()
    with pytest.raises(ImageDecodeError, match=r"10000x8000 pixels exceeds the limit of 50000000"):
        read_radiograph(path, 50_000_000)
    assert time.perf_counter() - started < 1.0


def test_huge_header_rejected_by_limit(tmp_path):
    path = tmp_path / "huge.png"
    _png_header_only(path, 100_000, 100_000)
    with pytest.raises(ImageDecodeError, match="featurize.max_pixels"):
        read_radiograph(path, 50_000_000)


def test_pixel_limit_param_overrides_pillow(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    path = tmp_path / "large-but-allowed.png"
    _png_header_only(path, 20_000, 10_000)  # 200 million pixels, above Pillow's default of about 179 million
    with pytest.raises(ImageDecodeError, match="not a readable image"):
        read_radiograph(path, 300_000_000)


def test_missing_file_raises(tmp_path):
    with pytest.raises(ImageDecodeError, match="absent.png: not a readable image"):
        read_radiograph(tmp_path / "absent.png", LIMIT)


def test_preprocess_fills_given_buffer(tmp_path):
    path = tmp_path / "gradient.png"
    Image.fromarray(_gradient((300, 200)), "L").save(path)
    batch = np.zeros((2, 32, 32, 3), np.float32)
    returned = preprocess_radiograph(path, 32, LIMIT, out=batch[1])
    assert np.shares_memory(returned, batch)
    np.testing.assert_array_equal(batch[1], preprocess_radiograph(path, 32, LIMIT))
    assert not batch[0].any()


def test_16_bit_preprocess_matches_8_bit(tmp_path):
    gray = _gradient((300, 200))
    eight, sixteen = tmp_path / "eight.png", tmp_path / "sixteen.png"
    Image.fromarray(gray, "L").save(eight)
    Image.fromarray(gray.astype(np.uint16) * 257).save(sixteen)
    np.testing.assert_allclose(preprocess_radiograph(sixteen, 32, LIMIT), preprocess_radiograph(eight, 32, LIMIT), atol=1e-5)


def _both_decoders(path, monkeypatch):
    fast = preprocess_radiograph(path, 64, LIMIT)
    with monkeypatch.context() as patch:
        patch.setattr(images, "imagecodecs", None)
        pillow = preprocess_radiograph(path, 64, LIMIT)
    return fast, pillow


def test_libpng_matches_pillow_on_radiographs(shared_data, monkeypatch):
    assert images.imagecodecs is not None, "imagecodecs is a declared dependency"
    for path in sorted((shared_data / "nih-cxr-sample").glob("*.png"))[:3]:
        assert images._decode_grayscale_png(path, LIMIT) is not None, f"libpng did not decode {path.name}"
        fast, pillow = _both_decoders(path, monkeypatch)
        np.testing.assert_array_equal(fast, pillow, err_msg=path.name)


@pytest.mark.parametrize("bits", [8, 16])
def test_libpng_matches_pillow_on_gray_png(tmp_path, monkeypatch, bits):
    gray = np.random.default_rng(bits).integers(0, 2**bits, (90, 120)).astype(np.uint8 if bits == 8 else np.uint16)
    path = tmp_path / f"gray{bits}.png"
    Image.fromarray(gray).save(path)
    assert images._decode_grayscale_png(path, LIMIT) is not None
    fast, pillow = _both_decoders(path, monkeypatch)
    np.testing.assert_array_equal(fast, pillow)


def test_libpng_pixel_limit_rejects(tmp_path):
    path = tmp_path / "large.png"
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(path)
    with pytest.raises(ImageDecodeError, match="featurize.max_pixels"):
        preprocess_radiograph(path, 32, 5_000)
