"""Decode radiographs and turn them into DenseNet-121 input tensors.

The pipeline and ``cxrgen predict`` both call :func:`preprocess_radiograph`, so a study
is seen the same way in training and in use.
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

try:
    import imagecodecs
except ImportError:  # a declared dependency; without it Pillow decodes every image, a little slower
    imagecodecs = None

from pipeline.errors import PipelineError

# ImageNet statistics in RGB order for pixels scaled to [0, 1]. CheXNet was trained on
# inputs normalised with exactly these values, and so were Keras' ImageNet DenseNet weights.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
NORMALISATION = "imagenet: (pixel/255 - mean) / std, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Part of the feature cache key: bump it whenever a change here changes any output pixel.
PREPROCESSING_VERSION = 3
RAISE_PIXEL_LIMIT = (
    "if the image is genuine, raise featurize.max_pixels (pipeline) or --max-pixels (predict, serve)"
)


class ImageDecodeError(PipelineError, ValueError):
    """Raised when a file cannot be used as a radiograph; the message is ``"<path>: <reason>"``.

    ``reason`` alone describes the content, so it can be stored for every file with the same bytes.
    """

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason

    def __reduce__(self):
        # Exceptions pickle their message by default; this one is rebuilt from its two parts.
        return type(self), (self.path, self.reason)


def read_radiograph(path: Path | str, max_pixels: int) -> np.ndarray:
    """Decode a radiograph to grayscale intensities.

    Accepts 8-bit and 16-bit grayscale, RGB, RGBA and palette images in any format Pillow
    reads. Returns a float32 array of shape (height, width) with values in [0, 1].
    Raises ImageDecodeError for empty, truncated, non-image or oversized files.
    """
    image, full_scale = _decode_gray(path, max_pixels)
    return np.clip(np.asarray(image, dtype=np.float32) / full_scale, 0.0, 1.0)


def _decode_gray(path: Path | str, max_pixels: int) -> tuple[Image.Image, float]:
    """Decode to a mode "F" image and the value that means full intensity (255, 65535 or 1)."""
    path = Path(path)
    _allow_pixels(max_pixels)
    decoded = _decode_grayscale_png(path, max_pixels)
    if decoded is not None:
        return decoded
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own limit; the check below raises a clearer error instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    path, f"{width}x{height} pixels exceeds the limit of {max_pixels}; {RAISE_PIXEL_LIMIT}"
                )
            image.load()
            return _to_float_gray(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ImageDecodeError(path, f"not a readable image ({_error_without_path(error, path)})") from None
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(
            path, f"rejected as a decompression bomb ({error}); {RAISE_PIXEL_LIMIT}"
        ) from None


def _error_without_path(error: Exception, path: Path) -> str:
    """Describe a decoding error without the file name that Pillow and the OS put in their messages."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error).replace(f" '{path}'", "").replace(str(path), "the file")


def _allow_pixels(max_pixels: int) -> None:
    """Raise Pillow's own pixel limit to ``max_pixels`` so that the parameter decides.

    Pillow rejects images above twice ``Image.MAX_IMAGE_PIXELS`` (about 179 million pixels
    by default) when it opens them, and warns above that value, before any pixel is read.
    """
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _decode_grayscale_png(path: Path, max_pixels: int) -> tuple[Image.Image, float] | None:
    """Decode an 8- or 16-bit grayscale PNG with libpng through imagecodecs.

    libpng decodes a 1024x1024 radiograph in about 80% of Pillow's CPU time, to the same
    pixels. Returns None for every other file and for files libpng rejects, so that Pillow
    decodes them or reports the error.
    """
    if imagecodecs is None:
        return None
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if len(data) < 26 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    width, height, bit_depth, color_type = struct.unpack(">IIBB", data[16:26])
    if color_type != 0 or bit_depth not in (8, 16):
        return None
    if width * height > max_pixels:
        raise ImageDecodeError(
            path, f"{width}x{height} pixels exceeds the limit of {max_pixels}; {RAISE_PIXEL_LIMIT}"
        )
    try:
        pixels = imagecodecs.png_decode(data)
    except Exception:  # imagecodecs raises PngError and others for damaged files; Pillow names the problem
        return None
    if pixels.ndim != 2:
        return None
    if bit_depth == 8:
        return Image.fromarray(pixels).convert("F"), 255.0
    return Image.fromarray(pixels.astype(np.float32)), 65535.0


def _to_float_gray(image: Image.Image) -> tuple[Image.Image, float]:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        pixels = np.asarray(image, dtype=np.float32)
        full_scale = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        return Image.fromarray(pixels, mode="F"), full_scale
    if image.mode == "F":
        return image.copy(), 1.0
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    gray = image if image.mode == "L" else image.convert("L")
    return gray.convert("F"), 255.0


def resize_and_normalise(gray: np.ndarray, image_size: int) -> np.ndarray:
    """Resize a grayscale radiograph and apply ImageNet normalisation.

    ``gray`` is float32 (height, width) in [0, 1]. Returns float32
    (image_size, image_size, 3): the gray channel copied to R, G and B, then normalised
    with IMAGENET_MEAN and IMAGENET_STD. The aspect ratio is not kept, as in CheXNet.
    """
    return _resize_and_normalise(Image.fromarray(gray, mode="F"), 1.0, image_size)


def _resize_and_normalise(image: Image.Image, full_scale: float, image_size: int, out: np.ndarray | None = None) -> np.ndarray:
    # reducing_gap first shrinks by a whole factor with a box filter, then resamples
    # bilinearly: 0.8 ms instead of 2.1 ms for 1024 to 224 px, within 4/255 of plain bilinear.
    resized = image.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    gray = np.asarray(resized, dtype=np.float32) / np.float32(full_scale)
    np.clip(gray, 0.0, 1.0, out=gray)
    if out is None:
        out = np.empty((image_size, image_size, 3), np.float32)
    for channel in range(3):
        np.subtract(gray, IMAGENET_MEAN[channel], out=out[:, :, channel])
        np.divide(out[:, :, channel], IMAGENET_STD[channel], out=out[:, :, channel])
    return out


def preprocess_radiograph(path: Path | str, image_size: int, max_pixels: int, out: np.ndarray | None = None) -> np.ndarray:
    """Decode, resize and normalise one radiograph: float32 (image_size, image_size, 3).

    Resizing happens before scaling to [0, 1], which saves a pass over the full-size image.
    ``out``, if given, is filled in place (a row of a batch) and returned.
    """
    image, full_scale = _decode_gray(path, max_pixels)
    return _resize_and_normalise(image, full_scale, image_size, out)
