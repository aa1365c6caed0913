"""PyTorch definitions of the zoo and `build_model`."""
from __future__ import annotations

import logging

from ..errors import UserError
from ..zoo import ModelSpec, Preprocessing, check_img_size, default_preprocessing, get_spec

log = logging.getLogger("vit_deploy")


def build_model(name: str, num_classes: int | None = None, img_size: int | None = None,
                weights=None, *, checkpoint=None):
    """Build a zoo variant in eval mode: float32 NCHW images -> logits, or with
    num_classes=0 the pooled embedding (the class token after the final norm).

    num_classes defaults to the checkpoint's head (0 when it has none), else 1000;
    img_size to what the weights say, else 224.
    `weights` is a local file or directory (timm, transformers, Google .npz or
    vit-deploy layout) or a hub name; `checkpoint` an already read one.
    The returned module carries `.preprocessing`, `.labels`, `.output` and `.weights_sha256`.
    """
    from .._optional import require_torch
    require_torch("build_model")
    from ..weights import apply_checkpoint, checkpoint_img_size, checkpoint_num_classes, read_checkpoint
    from .vit import VisionTransformer

    spec = get_spec(name)
    ckpt = checkpoint if checkpoint is not None else (read_checkpoint(weights) if weights is not None else None)
    if ckpt is not None:
        if num_classes is None:  # the checkpoint's head decides; a headless one gives the embedding
            num_classes = checkpoint_num_classes(ckpt.state_dict) or 0
        img_size = img_size or checkpoint_img_size(ckpt.state_dict, spec.stride) or 224
    num_classes = 1000 if num_classes is None else num_classes
    img_size = img_size or 224
    if num_classes < 0:
        raise UserError(f"--num-classes must be 0 (the embedding) or more, got {num_classes}")
    check_img_size(spec, img_size)
    model = VisionTransformer(spec, num_classes, img_size,
                              layer_norm_eps=ckpt.layer_norm_eps if ckpt else None)
    pre = default_preprocessing(spec, img_size)
    labels = None
    if ckpt is not None:
        apply_checkpoint(model, ckpt)
        if ckpt.preprocessing:
            pre = Preprocessing.from_dict({**pre.to_dict(), **ckpt.preprocessing})
        if ckpt.labels and len(ckpt.labels) == num_classes:
            labels = ckpt.labels
    model.preprocessing, model.labels = pre, labels
    model.output = "logits" if num_classes else "embedding"
    model.weights_sha256 = ckpt.sha256 if ckpt else None
    model.weights_layout = ckpt.layout if ckpt else None
    return model.eval().requires_grad_(False)


def count_model(spec: ModelSpec, num_classes: int = 1000, img_size: int = 224) -> tuple[int, float]:
    """Parameters and GFLOPs (2 x multiply-adds) of one image, computed on the meta device."""
    from .._optional import require_torch
    torch = require_torch("counting parameters and FLOPs")
    from torch.utils.flop_counter import FlopCounterMode

    from .vit import VisionTransformer

    with torch.device("meta"):
        model = VisionTransformer(spec, num_classes, img_size).eval()
        params = sum(p.numel() for p in model.parameters())
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.empty(1, 3, img_size, img_size))
    return params, counter.get_total_flops() / 1e9
