"""The model zoo as data: the reference article's table, one row per variant.

Nothing here imports torch, so `vit-deploy models` and the golden-output check
stay fast and light.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass

from .errors import UserError

# Preprocessing of the original / augreg ViT weights (timm's default_cfg for them).
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    patch_size: int
    layers: int
    hidden_size: int
    mlp_size: int
    heads: int
    # Hybrid models: ResNet-v2 stage depths before the transformer (empty for plain ViT).
    backbone_layers: tuple[int, ...] = ()
    timm_name: str = ""
    hf_name: str = ""
    layer_norm_eps: float = 1e-6

    @property
    def is_hybrid(self) -> bool:
        return bool(self.backbone_layers)

    @property
    def stride(self) -> int:
        """Pixels per token side: the patch, or the backbone's total stride (16 for R50)."""
        return 4 * 2 ** (len(self.backbone_layers) - 1) if self.is_hybrid else self.patch_size


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input; stored with every exported model."""
    img_size: int = 224
    crop_pct: float = 0.9
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = INCEPTION_MEAN
    std: tuple[float, float, float] = INCEPTION_STD

    @property
    def resize_size(self) -> int:
        # timm: scale the short side to img_size / crop_pct, then centre-crop img_size.
        return int(self.img_size / self.crop_pct)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["resize_size"] = self.resize_size
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(img_size=int(d["img_size"]), crop_pct=float(d["crop_pct"]),
                   interpolation=str(d["interpolation"]),
                   mean=tuple(float(x) for x in d["mean"]), std=tuple(float(x) for x in d["std"]))


ZOO: dict[str, ModelSpec] = {s.name: s for s in [
    #          name            patch layers  D     MLP  heads
    ModelSpec("vit-ti16",       16, 12,  192,  768,  3, timm_name="vit_tiny_patch16_224"),
    ModelSpec("vit-s16",        16, 12,  384, 1536,  6, timm_name="vit_small_patch16_224"),
    ModelSpec("vit-b16",        16, 12,  768, 3072, 12, timm_name="vit_base_patch16_224",
              hf_name="google/vit-base-patch16-224"),
    ModelSpec("vit-b32",        32, 12,  768, 3072, 12, timm_name="vit_base_patch32_224"),
    ModelSpec("vit-l16",        16, 24, 1024, 4096, 16, timm_name="vit_large_patch16_224",
              hf_name="google/vit-large-patch16-224"),
    ModelSpec("vit-l32",        32, 24, 1024, 4096, 16, timm_name="vit_large_patch32_224"),
    ModelSpec("vit-h14",        14, 32, 1280, 5120, 16, timm_name="vit_huge_patch14_224"),
    # Hybrid: ResNet-50 v2 (stage 4 folded into stage 3: 3/4/9), 1x1 patch on its 14x14x1024 map.
    ModelSpec("r50-vit-b16",     1, 12,  768, 3072, 12, backbone_layers=(3, 4, 9),
              timm_name="vit_base_r50_s16_224"),
]}


def get_spec(name: str) -> ModelSpec:
    try:
        return ZOO[name]
    except KeyError:
        close = difflib.get_close_matches(name, ZOO, n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}?" if close else f"known models: {', '.join(ZOO)}"
        raise UserError(f"unknown model '{name}': {hint}") from None


def check_img_size(spec: ModelSpec, img_size: int) -> None:
    if img_size <= 0 or img_size % spec.stride:
        raise UserError(f"image size {img_size} is not a positive multiple of {spec.name}'s "
                        f"patch stride {spec.stride}; try {max(spec.stride, round(img_size / spec.stride) * spec.stride)}")


def default_preprocessing(spec: ModelSpec, img_size: int = 224) -> Preprocessing:
    return Preprocessing(img_size=img_size)


def spec_dict(spec: ModelSpec) -> dict:
    d = asdict(spec)
    d["backbone_layers"] = list(spec.backbone_layers)
    return d
