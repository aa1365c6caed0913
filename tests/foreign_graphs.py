"""ViT ONNX graphs as users bring them: exported by timm + torch.onnx and by Hugging Face
transformers (separate q/k/v, opset 14 with LayerNorm decomposed, or 17), random weights.

Shared by the INT8 tests and benchmarks/int8_peers.py. `small=True` gives 2-layer,
64-px versions for the test suite; the benchmark uses the real ViT-S sizes.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

GRAPHS = ("vit-deploy", "timm-vit", "timm-deit-distilled", "timm-dinov2-reg", "hf-vit-op14", "hf-vit-op17",
          "hf-dinov2-op14", "hf-dinov2-op17")
# torch.onnx.export's dynamo exporter (its default since torch 2.9, needs onnxscript): opset 18+,
# LayerNormalization and Gelu as single nodes, q/k/v split by Slice, every weight in a .data file
DYNAMO_GRAPHS = ("timm-vit-dynamo", "hf-dinov2-dynamo")
IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}


def torch_export(model, path: Path, size: int, opset: int, input_name: str = "pixel_values",
                 dynamo: bool = False) -> None:
    import torch
    x = torch.randn(2, 3, size, size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:  # torch.onnx.export's default since torch 2.9: what a user calling it plainly gets
            import contextlib
            import io
            with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
                torch.onnx.export(model, (x,), str(path), input_names=[input_name], output_names=["output"],
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
            return
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, input_names=[input_name],
                          output_names=["output"], dynamic_axes={input_name: {0: "batch"}, "output": {0: "batch"}})


class FirstOutput:
    """HF models return a ModelOutput; export its pooled embedding or logits."""

    def __new__(cls, model, attr):
        import torch

        class Wrap(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, x):
                return getattr(self.model(pixel_values=x), attr)
        return Wrap().eval()


def make_graph(kind: str, out_dir: Path, small: bool = True, seed: int = 0) -> Path:
    """Export graph `kind` into out_dir; returns the .onnx path (with preprocessor_config.json
    beside it for the Hugging Face ones, as their exporters write)."""
    import torch
    torch.manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{kind}.onnx"
    depth = 2 if small else 12
    dynamo = kind.endswith("-dynamo")
    kind = kind.removesuffix("-dynamo")
    if kind == "vit-deploy":
        from vit_deploy.models import build_model
        from vit_deploy.onnx_export import export_onnx
        from vit_deploy.zoo import Preprocessing, IMAGENET_MEAN, IMAGENET_STD
        size = 64 if small else 224
        model = build_model("vit-ti16" if small else "vit-s16", num_classes=100, img_size=size)
        if small:
            model.blocks = model.blocks[:depth]
        pre = Preprocessing(img_size=size, crop_pct=0.9, mean=IMAGENET_MEAN, std=IMAGENET_STD).to_dict()
        export_onnx(model.eval(), path, 17, {"preprocessing": pre})
        return path
    if kind.startswith("timm-"):
        import timm
        name = {"timm-vit": "vit_small_patch16_224", "timm-deit-distilled": "deit_small_distilled_patch16_224",
                "timm-dinov2-reg": "vit_small_patch14_reg4_dinov2"}[kind]
        patch = 14 if "dinov2" in kind else 16
        size = patch * 4 if small else 224
        kw = {"depth": depth, "img_size": size}
        if small:
            kw.update(embed_dim=192, num_heads=3)
        model = timm.create_model(name, pretrained=False, num_classes=100, **kw).eval()
        if "dinov2" in kind:
            for blk in model.blocks:  # trained layer scales are far from timm's init of 1e-5
                for ls in (blk.ls1, blk.ls2):
                    ls.gamma.data.uniform_(0.2, 1.0)
        torch_export(model, path, size, 17, "input", dynamo)
        (out_dir / "preprocessor_config.json").write_text(json.dumps({**IMAGENET, "size": {"shortest_edge": size},
                                                                       "crop_size": {"height": size, "width": size},
                                                                       "do_center_crop": True, "resample": 3}))
        return path
    opset = 14 if kind.endswith("op14") else 17  # the dynamo exporter takes its own
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTForImageClassification
    hidden, heads = (192, 3) if small else (384, 6)
    if kind.startswith("hf-vit"):
        size = 64 if small else 224
        cfg = ViTConfig(hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads,
                        intermediate_size=4 * hidden, image_size=size, patch_size=16, num_labels=100)
        model = FirstOutput(ViTForImageClassification(cfg).eval(), "logits")
    else:
        size = 56 if small else 224
        cfg = Dinov2Config(hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads,
                           mlp_ratio=4, image_size=size, patch_size=14, layerscale_value=0.5)
        model = FirstOutput(Dinov2Model(cfg).eval(), "pooler_output")
    torch_export(model, path, size, opset, dynamo=dynamo)
    (out_dir / "preprocessor_config.json").write_text(json.dumps({**IMAGENET, "size": {"shortest_edge": size},
                                                                   "crop_size": {"height": size, "width": size},
                                                                   "do_center_crop": True, "resample": 3}))
    return path
