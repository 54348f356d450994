"""Radiograph decoding across PNG modes, normalisation, and rejection of bad files."""

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


def test_jpeg_named_png_decodes(tmp_path):
    path = tmp_path / "really-a-jpeg.png"
    Image.fromarray(_gradient(), "L").save(path, format="JPEG", quality=95)
    assert read_radiograph(path, LIMIT).shape == (30, 40)


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
