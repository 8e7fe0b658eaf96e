"""Image decoding shared by the dataset and ``drcnn infer``: one function, one set of rules.

:func:`load_image` returns a float ``(3, H, W)`` tensor in ``[0, 1]``:

- EXIF orientation is applied (``PIL.ImageOps.exif_transpose``), as detectron2's
  ``read_image`` and torchvision's ``decode_image(apply_exif_orientation=True)`` do: pixels and
  size are those of the image as displayed, which is what COCO-style annotations describe (the
  dataset checks the decoded size against the annotation's ``width``/``height``).
- 8-bit images of any PIL mode (grayscale, RGBA, palette, CMYK, ...) are converted to RGB and
  divided by 255; 16-bit grayscale (modes ``I;16*``, and ``I`` with values in ``0..65535``,
  e.g. 16-bit PGM) is divided by 65535 and repeated over the three channels. PIL's own
  conversion to RGB would clip 16-bit values at 255 (an all-white image). 16-bit colour PNGs
  PIL itself reads as 8-bit RGB (the high byte of each sample), so they are scaled right.

Refused with a one-line :class:`DrcnnError` naming the file: unreadable files; images over
PIL's decompression-bomb limit ``PIL.Image.MAX_IMAGE_PIXELS`` (about 89 megapixels; PIL only
warns between one and two times the limit, drcnn refuses both); floating-point pixels (mode
``F``, no defined value range) and 32-bit integers outside ``0..65535``; images whose long
side is more than :data:`MAX_ASPECT_RATIO` times the short side, because the model's resize
(short side to ``min_size``, long side at most ``max_size``) would make the short side shorter
than one pixel (``interpolate`` fails on a 1x5000 image) or a few pixels at most.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from drcnn.errors import DrcnnError

# Long side / short side. With the resize's max_size >= 100 (all shipped configs), the short
# side of an image at this ratio still resizes to at least one pixel.
MAX_ASPECT_RATIO = 100
MAX_16BIT = 65535
# what PIL raises for a file it cannot decode (truncated, corrupt, wrong format)
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)


def load_image(path: str | Path) -> Tensor:
    """The image file ``path`` as a float ``(3, H, W)`` tensor in ``[0, 1]``, EXIF orientation
    applied (see the module docstring for the modes read and the images refused)."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _check_aspect_ratio(path, image.size)
                return _to_float_rgb(path, ImageOps.exif_transpose(image))
    except FileNotFoundError as exc:
        raise DrcnnError(f"{path}: image file not found") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DrcnnError(f"{path}: refused as a possible decompression bomb ({exc})") from exc
    except DECODE_ERRORS as exc:
        raise DrcnnError(f"{path}: cannot read image ({exc})") from exc


def _check_aspect_ratio(path: Path, size: tuple[int, int]) -> None:
    """Refuse an image (``size`` = width, height) with an empty side or a long side more than
    :data:`MAX_ASPECT_RATIO` times its short side."""
    short, long = sorted(size)
    if short < 1 or long > MAX_ASPECT_RATIO * short:
        raise DrcnnError(
            f"{path}: {size[0]}x{size[1]} pixels; the long side may be at most "
            f"{MAX_ASPECT_RATIO} times the short side (resizing would leave a side under a pixel)"
        )


def _to_float_rgb(path: Path, image: Image.Image) -> Tensor:
    """Decoded pixels of ``image`` as float RGB in ``[0, 1]``, scaled by the format's maximum."""
    if image.mode == "F":
        raise DrcnnError(
            f"{path}: floating-point pixels (PIL mode F) have no defined range; "
            "expected an 8- or 16-bit image"
        )
    if not image.mode.startswith("I"):  # 8-bit modes: PIL converts them to RGB
        return F.to_dtype(F.pil_to_tensor(image.convert("RGB")), torch.float32, scale=True)
    values = np.asarray(image)  # I;16* (uint16) or I (int32)
    if values.min() < 0 or values.max() > MAX_16BIT:
        raise DrcnnError(
            f"{path}: 32-bit pixel values {values.min()}..{values.max()} lie outside 0..65535; "
            "expected an 8- or 16-bit image"
        )
    gray = torch.from_numpy(values.astype(np.float32) / MAX_16BIT)
    return gray.unsqueeze(0).repeat(3, 1, 1)
