"""Images of your own in: image files and folders -> the 32x32 uint8 tensors the network reads.

Any size is accepted. Each image is turned upright (its EXIF orientation), made RGB (transparent
pixels on white), cut to the largest centred square (CIFAR-10 images are square, and squeezing a
wide photo would distort the objects in it) and resized to 32x32 with Pillow's bilinear filter,
which averages over every source pixel when it shrinks (no aliasing). Only the decoders of the
formats below are ever used: a file is read as pixels, never handed to an outside program.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from normlab import folders
from normlab.data import IMAGE_SIZE as SIZE  # CIFAR-10's side, in pixels
from normlab.errors import UsageError

FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")  # Pillow decoders normlab opens files with
SUFFIXES = (".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".gif", ".webp", ".tif", ".tiff")  # what a folder is searched for
DESCRIBED = "PNG, JPEG, BMP, GIF, WebP or TIFF"


class ImageError(UsageError):
    """One input cannot be read as an image; the message names the file and why."""


def expand(path: str | os.PathLike) -> list[Path]:
    """The image files that ``path`` names: itself, or a folder's image files (sorted, not recursive);
    ``ImageError`` if it gives none."""
    path = Path(path)
    if path.is_dir():
        found = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in SUFFIXES and not f.name.startswith("."))
        if not found:
            raise ImageError(f"{path}: the folder holds no image files ({', '.join(SUFFIXES)}); skipped")
        return found
    if not path.is_file():
        raise ImageError(f"{path}: {folders.why_missing(path)}; skipped")
    return [path]  # named on purpose: tried whatever its suffix


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The image at ``path`` as the network sees it: (3, 32, 32) uint8 RGB. ``ImageError`` if it cannot be read."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # Pillow warns of images above MAX_IMAGE_PIXELS: refused below in one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path, formats=FORMATS)
        with im:
            w, h = im.size
            if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
                raise ImageError(f"{path}: too large to read safely ({w:,}x{h:,} = {w * h:,} pixels; normlab reads up to "
                                 f"{Image.MAX_IMAGE_PIXELS:,}, Pillow's guard against decompression bombs); shrink it first; skipped")
            im.load()  # Pillow decodes lazily: a truncated file fails here, not later
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            im = im.convert("RGB")
            w, h = im.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            small = im.resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
    except Image.UnidentifiedImageError:
        raise ImageError(f"{path}: not an image normlab can read ({DESCRIBED}); skipped") from None
    except (PermissionError, FileNotFoundError, IsADirectoryError) as e:
        raise ImageError(f"{path}: cannot be read ({e.strerror or type(e).__name__}); skipped") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: too large to read safely ({e}); shrink it first; skipped") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or damaged data (Pillow raises all three)
        raise ImageError(f"{path}: a damaged or truncated image ({' '.join(str(e).split()) or type(e).__name__}); skipped") from None
    return np.ascontiguousarray(np.asarray(small, dtype=np.uint8).transpose(2, 0, 1))  # (32, 32, 3) -> (3, 32, 32)
