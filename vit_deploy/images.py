"""Images -> model input, with exactly the preprocessing stored with the model.

numpy and Pillow only (no torch), so golden checks on a device stay light.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from .errors import UserError
from .zoo import Preprocessing

log = logging.getLogger("vit_deploy")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1}  # PIL.Image.Resampling values


def default_calibration_dir() -> Path:
    """The photos shipped inside the package (vit_deploy/data/calibration/), so that a
    wheel install has them as well as the checkout."""
    return Path(__file__).resolve().parent / "data" / "calibration"


def list_images(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"image directory not found: {directory}")
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"{directory}: holds no image (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, recursively)")
    return files


def preprocess(path: Path, pre: Preprocessing) -> np.ndarray:
    """One image file -> float32 [3, H, W]: resize short side, centre crop, normalize."""
    from PIL import Image
    with Image.open(path) as im:
        im = _as_rgb(im)
        w, h = im.size
        short = pre.resize_size
        scale = short / min(w, h)
        nw, nh = max(short, round(w * scale)), max(short, round(h * scale))
        im = im.resize((nw, nh), _RESAMPLE.get(pre.interpolation, 3))
        left, top = (nw - pre.img_size) // 2, (nh - pre.img_size) // 2
        im = im.crop((left, top, left + pre.img_size, top + pre.img_size))
        x = np.asarray(im, dtype=np.float32) / 255.0
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def _as_rgb(im):
    """Any mode (L, P, RGBA, CMYK, 16-bit grey) -> 8-bit RGB. Pillow's own conversion of a
    16-bit grey image clips every value over 255 (a 16-bit PNG photo became nearly white):
    its 0..65535 is scaled to 0..255 first."""
    from PIL import Image
    if im.mode.startswith("I;16") or (im.mode == "I" and np.asarray(im).max(initial=0) > 255):
        grey = np.asarray(im, dtype=np.float64) / 257.0
        im = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def load_images(paths: list[Path], pre: Preprocessing, strict: bool = False) -> tuple[np.ndarray, list[Path]]:
    """Preprocess every readable image; unreadable ones are skipped and listed in a
    warning (with `strict`, the first one is an error)."""
    arrays, ok, skipped = [], [], []
    for p in paths:
        try:
            arrays.append(preprocess(p, pre))
            ok.append(p)
        except Exception as e:  # PIL raises many types for corrupt files
            if strict:
                raise UserError(f"{p}: not a readable image ({type(e).__name__})") from None
            skipped.append(f"{p.name} ({type(e).__name__})")
    if skipped:
        log.warning("skipped %d unreadable image(s): %s", len(skipped), ", ".join(skipped))
    if not arrays:
        raise UserError(f"none of the {len(paths)} image(s) could be read")
    return np.stack(arrays), ok


def split_for_calibration(paths: list[Path], calib_size: int) -> tuple[list[Path], list[Path]]:
    """A fixed pseudo-random split by file name: calibration first, the rest held out."""
    order = sorted(paths, key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())
    return order[:calib_size], order[calib_size:]
