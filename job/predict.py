"""`python -m job predict`: read digits from image files, prepared the way MNIST's digits were.

MNIST's digits are light ink on black, their ink fitted into 20x20 pixels (aspect kept,
anti-aliased) and placed in 28x28 so that the centre of mass is the centre. The net has
only ever seen that, so a photo or a scan is brought into the same form before it is read.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from job.data import normalize
from job.errors import message_line
from job.files import open_regular
from job.model import load_model

FIELD, BOX = 28, 20
"""MNIST's image size and the box its digits' ink was fitted into."""

INK_THRESHOLD = 0.2
"""Share of the strongest ink above which a pixel counts as ink when cropping: paper grain and
shadows stay outside the crop."""


class ImageFileError(Exception):
    """One image cannot be read; the others are still predicted."""


@dataclass(frozen=True)
class Prediction:
    file: str
    digit: int
    probability: float
    probabilities: list[float]

    def line(self) -> str:
        return f"{self.file}: {self.digit} (probability {self.probability:.4f})"

    def json(self) -> str:
        return json.dumps(
            {
                "file": self.file,
                "digit": self.digit,
                "probability": self.probability,
                "probabilities": self.probabilities,
            }
        )


MAX_PIXELS = 64_000_000
"""The largest image read (width x height): a 64-megapixel photo or scan. Checked from the header,
before decoding: a 38 KB PNG can declare 13300 x 13300 pixels and decode to gigabytes."""

Image.MAX_IMAGE_PIXELS = None  # Pillow's own bomb check, replaced by _check_size (whose message gives the size)

WORKING_SIDE = 2048
"""Larger images are first shrunk (by an integer factor, box filter) so that their longer side is
at most this: a digit needs far fewer pixels, and the float copies below stay small."""


def read_grey(path: str | Path) -> np.ndarray:
    """The image as float grey levels (any size up to MAX_PIXELS, colour or grey, 8 or 16 bits, or
    float); unreadable, oversized or non-finite files raise ImageFileError."""
    fix = "pass the path of a PNG or JPEG image"
    try:
        # A regular file only (a FIFO would block); Image.open reads the header only.
        with open_regular(path, "", fix, ImageFileError) as f, Image.open(f) as image:
            _check_size(path, image.size)
            image.load()  # decode now: a truncated file fails here, not later
            image = ImageOps.exif_transpose(image)  # phone photos are stored sideways with a rotation tag
            return _grey(_shrunk(image))
    except UnidentifiedImageError:
        raise ImageFileError(f"{path} is not an image Pillow can read; pass a PNG or JPEG image") from None
    except (OSError, SyntaxError, ValueError) as e:
        # Pillow reports damaged files as OSError ("image file is truncated"), SyntaxError or ValueError.
        raise ImageFileError(f"{path} is damaged or unreadable ({message_line(e)}); pass an intact image") from None


def _check_size(path: str | Path, size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_PIXELS:
        raise ImageFileError(
            f"{path} is {width}x{height} pixels ({width * height / 1e6:.0f} megapixels), more than the "
            f"{MAX_PIXELS / 1e6:.0f} megapixels a digit reader takes; crop it to the digit or shrink it"
        )


def _shrunk(image: Image.Image) -> Image.Image:
    factor = -(-max(image.size) // WORKING_SIDE)
    if factor <= 1:
        return image
    if image.mode.startswith("I;16"):  # 16-bit grey: reduce() takes 32-bit, converting keeps the depth
        image = image.convert("I")
    elif image.mode not in ("L", "RGB", "RGBA", "LA", "I", "F"):
        image = image.convert("RGBA" if "A" in image.getbands() or "transparency" in image.info else "L")
    return image.reduce(factor)


def _grey(image: Image.Image) -> np.ndarray:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit or float grey: keep the depth
        pixels = np.asarray(image, dtype=np.float32)
        if not np.isfinite(pixels).all():  # a float TIFF can hold NaN or infinity: no grey level
            raise ValueError(f"{int((~np.isfinite(pixels)).sum())} pixel(s) are NaN or infinite")
    else:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            # Transparent pixels have an arbitrary colour (often black): put the drawing on white paper.
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    return pixels


def mnist_like(grey: np.ndarray) -> np.ndarray:
    """Grey levels -> 28x28 uint8, light ink on black, as MNIST's digits were made."""
    low, high = grey.min(), grey.max()
    if high <= low:
        raise ImageFileError("the image is one flat colour, no digit in it")
    grey = (grey - low) / (high - low)  # any bit depth, any exposure: the darkest is 0, the lightest 1
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    background = float(np.median(border))
    if background > 0.5:  # dark ink on light paper: MNIST's ink is the light part
        grey, background = 1.0 - grey, 1.0 - background
    ink = np.clip(grey - background, 0.0, None)  # grey paper becomes black, as in MNIST
    if ink.max() <= 0:
        raise ImageFileError("no ink found (the image is all background)")
    ink /= ink.max()
    rows = np.flatnonzero((ink > INK_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((ink > INK_THRESHOLD).any(axis=0))
    ink = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]

    # Fit the longer side into 20 pixels; the resampling filter anti-aliases as MNIST's did.
    height, width = ink.shape
    scale = BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = Image.fromarray(np.uint8(np.round(ink * 255))).resize(size, Image.LANCZOS)
    box = np.asarray(small, dtype=np.float32)
    if box.max() <= 0:
        raise ImageFileError("no ink left after scaling to 20x20 pixels")
    box /= box.max()  # a thin stroke on a large photo fades when shrunk: restore full contrast

    # Place the box so that its centre of mass lands on the field's centre (kept inside the field).
    ys, xs = np.indices(box.shape)
    mass = box.sum()
    top = _clamp(round(FIELD / 2 - (ys * box).sum() / mass), 0, FIELD - box.shape[0])
    left = _clamp(round(FIELD / 2 - (xs * box).sum() / mass), 0, FIELD - box.shape[1])
    field = np.zeros((FIELD, FIELD))
    field[top : top + box.shape[0], left : left + box.shape[1]] = box
    return np.uint8(np.round(field * 255))


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def prepare(path: str | Path) -> torch.Tensor:
    """One image file as the net's input (1, 1, 28, 28), normalised like the training data."""
    grey = read_grey(path)
    try:
        digit = mnist_like(grey)
    except ImageFileError as e:
        raise ImageFileError(f"{path}: {e}; pass an image of one dark digit on light paper or the reverse") from None
    return normalize(torch.from_numpy(digit).unsqueeze(0))


Reader = Callable[[torch.Tensor], torch.Tensor]
"""A digit reader: a normalised batch (N, 1, 28, 28) -> the log-probabilities (N, 10) of the digits."""


def checkpoint_reader(checkpoint: str) -> Reader:
    """The net of job/model.py with a model.pt's or a checkpoint's weights."""
    return load_model(checkpoint)


def onnx_file_reader(path: str) -> Reader:
    """An exported onnx file, run by onnxruntime: needs no weights or code of the training."""
    from job.export import onnx_reader

    run = onnx_reader(path)
    return lambda batch: torch.from_numpy(run(batch.numpy()))


def predict_file(read: Reader, path: str) -> Prediction:
    with torch.no_grad():
        probabilities = read(prepare(path)).exp().squeeze(0)
    digit = int(probabilities.argmax())
    return Prediction(
        file=path,
        digit=digit,
        probability=float(probabilities[digit]),
        probabilities=[float(p) for p in probabilities],
    )


def run_predict(images: list[str], as_json: bool, checkpoint: str | None = None, model: str | None = None) -> int:
    """Predict every file with the weights of `checkpoint` or the onnx file `model`; unreadable files
    get one error line each. Returns how many failed."""
    read = onnx_file_reader(model) if model is not None else checkpoint_reader(checkpoint)
    failed = 0
    for path in images:
        try:
            prediction = predict_file(read, path)
        except ImageFileError as e:
            failed += 1
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        print(prediction.json() if as_json else prediction.line(), flush=True)
    return failed
