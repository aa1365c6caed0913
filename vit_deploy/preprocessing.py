"""Where a foreign ONNX file's preprocessing comes from: never a guess.

In order: vit-deploy's own metadata in the file; `preprocessor_config.json` beside
it (Hugging Face and Optimum exports write one); `--mean/--std` or a named
`--preset`. With none of these the command stops: a wrong mean/std was the
largest single loss measured on a foreign ViT (output correlation 0.958 instead of
0.995 with 0.5/0.5 assumed for an ImageNet-normalized model).
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError
from .zoo import IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD, Preprocessing

# name -> (mean, std, crop_pct, interpolation): timm's and open_clip's defaults.
PRESETS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD, 0.875, "bicubic"),
    "inception": (INCEPTION_MEAN, INCEPTION_STD, 0.9, "bicubic"),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), 1.0, "bicubic"),
}
HF_CONFIG = "preprocessor_config.json"
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
OPTIONS_HINT = "--mean R,G,B --std R,G,B or --preset " + "|".join(PRESETS)


def _side(value) -> int | None:
    """An HF size entry: an int, {"height", "width"} or {"shortest_edge"}."""
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, dict):
        return int(value.get("shortest_edge") or value.get("height") or 0) or None
    return None


def from_hf_config(path: Path, img_size: int | None = None) -> Preprocessing:
    """A Hugging Face `preprocessor_config.json` -> Preprocessing (resize short side, centre crop)."""
    try:
        cfg = json.loads(Path(path).read_text())
        mean = tuple(float(x) for x in cfg.get("image_mean", IMAGENET_MEAN))
        std = tuple(float(x) for x in cfg.get("image_std", IMAGENET_STD))
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError("image_mean/image_std need three values, std > 0")
        resize = _side(cfg.get("size"))
        crop = _side(cfg.get("crop_size")) if cfg.get("do_center_crop", "crop_size" in cfg) else None
        size = img_size or crop or resize
        if not size:
            raise ValueError("no size or crop_size")
        # The crop share of the resized side; no centre crop means the whole resized image.
        crop_pct = size / resize if crop and resize and resize >= crop else 1.0
        interpolation = _PIL_RESAMPLE.get(int(cfg.get("resample", 3)), "bicubic")
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: not a usable preprocessor config ({e})") from None
    return Preprocessing(img_size=int(size), crop_pct=float(crop_pct), interpolation=interpolation, mean=mean, std=std)


def from_preset(name: str, img_size: int) -> Preprocessing:
    if name not in PRESETS:
        raise UserError(f"unknown preprocessing preset '{name}': choose from {', '.join(PRESETS)}")
    mean, std, crop_pct, interpolation = PRESETS[name]
    return Preprocessing(img_size=img_size, crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std)


def resolve(model_path: Path, meta: dict | None, graph_size: int | None, img_size=None, mean=None, std=None,
            preset: str | None = None) -> tuple[Preprocessing, str]:
    """The preprocessing for an ONNX file and a one-line account of where it came from."""
    if (mean is None) != (std is None):
        raise UserError("--mean and --std go together: pass both")
    if preset and mean is not None:
        raise UserError("pass either --preset or --mean/--std, not both")
    size = img_size or graph_size
    if meta and not (mean or preset):
        pre = Preprocessing.from_dict(meta)
        if img_size and img_size != pre.img_size:
            raise UserError(f"--img-size {img_size} differs from the {pre.img_size} px the model was exported for")
        return pre, "the model's vit-deploy metadata"
    config = Path(model_path).with_name(HF_CONFIG)
    if not (mean or preset) and config.is_file():
        return from_hf_config(config, size), str(config)
    if not size:
        raise UserError("the model's input has no fixed image size: pass --img-size")
    if preset:
        return from_preset(preset, int(size)), f"preset '{preset}'"
    if mean is not None:
        crop_pct = meta["crop_pct"] if meta else 1.0
        interpolation = meta["interpolation"] if meta else "bicubic"
        return (Preprocessing(img_size=int(size), crop_pct=crop_pct, interpolation=interpolation,
                              mean=tuple(mean), std=tuple(std)), "--mean/--std")
    raise UserError(f"{Path(model_path).name} carries no preprocessing and has no {HF_CONFIG} beside it: "
                    f"pass {OPTIONS_HINT}")
