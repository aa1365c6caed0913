"""`--model hf:DIR` (or a directory holding a config.json): a Hugging Face transformers
image model, built through transformers' own classes from config.json's `architectures`,
with the preprocessing of its preprocessor_config.json.

Image classifiers (ViTForImageClassification, DeiTForImageClassificationWithTeacher,
Dinov2ForImageClassification, ...) give logits; their backbones (ViTModel, Dinov2Model,
...) and any classifier asked for --num-classes 0 give the pooled embedding.
Weights are loaded by transformers from safetensors, or from a .bin with
torch.load(weights_only=True): plain tensors only.
"""
from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..zoo import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from . import BuiltModel, finish, output_dim, weights_record

log = logging.getLogger("vit_deploy")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def import_transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("Hugging Face model directories need transformers, which is not installed: "
                        "pip install 'vit-deploy[hf]'") from None
    return transformers


def image_architecture(arch: str, model_type: str) -> str:
    """'logits' for an image classifier, 'embedding' for the backbone of one; else exit 2 naming it."""
    import_transformers()
    from transformers.models.auto.modeling_auto import (MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
                                                        MODEL_MAPPING_NAMES)
    classifiers = {c for v in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.values()
                   for c in ((v,) if isinstance(v, str) else v)}
    if arch in classifiers:
        return "logits"
    base = MODEL_MAPPING_NAMES.get(model_type)
    if model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES and arch in ((base,) if isinstance(base, str) else base or ()):
        return "embedding"
    raise UserError(f"architecture {arch} ({model_type}) is not an image classifier or image backbone: "
                    f"vit-deploy takes image models such as ViTForImageClassification, "
                    f"DeiTForImageClassificationWithTeacher, Dinov2Model or Dinov2ForImageClassification")


class HFImageModel(nn.Module):
    """A transformers model as images -> one tensor: logits, or the pooled embedding
    (the pooler's output where the model has a plain one, else the class token after the final norm)."""

    def __init__(self, net: nn.Module, output: str, call_kwargs: dict):
        super().__init__()
        self.net, self.kind, self.call_kwargs = net, output, call_kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(pixel_values=x, **self.call_kwargs)
        if self.kind == "logits":
            return out.logits
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]


class HFSource:
    kind = "hf"

    def __init__(self, directory: str):
        self.dir = Path(directory)
        config = self.dir / "config.json"
        if not config.is_file():
            raise UserError(f"{directory}: not a Hugging Face model directory (no config.json)")
        try:
            self.config = json.loads(config.read_text())
        except ValueError as e:
            raise UserError(f"{config}: not valid JSON ({e})") from None
        archs = self.config.get("architectures") or []
        if not archs:
            raise UserError(f"{config}: names no architecture ('architectures' is empty)")
        self.arch, self.model_type = archs[0], str(self.config.get("model_type", "?"))
        self.native_output = image_architecture(self.arch, self.model_type)
        self.name = f"hf:{directory}"
        self.bundle_name = self.dir.resolve().name

    def build(self, num_classes, img_size, weights, options: dict) -> BuiltModel:
        transformers = import_transformers()
        from ..weights import sha256_file

        if options:
            raise UserError(f"{self.name}: Hugging Face directories take no --model-arg (edit config.json instead)")
        directory = self.dir
        if weights is not None:  # the same model's weights, moved: a directory or a file in one
            directory = Path(weights) if Path(weights).is_dir() else Path(weights).parent
        weights_file = next((directory / f for f in WEIGHT_FILES if (directory / f).is_file()), None)
        cls = getattr(transformers, self.arch, None)
        if cls is None:
            raise UserError(f"transformers {transformers.__version__} has no class {self.arch}: upgrade transformers")
        config = transformers.AutoConfig.from_pretrained(str(self.dir))
        config._attn_implementation = "eager"  # plain MatMul + Softmax: portable to every runtime
        if weights_file is not None:
            transformers.utils.logging.disable_progress_bar()  # the pipeline prints its own stages
            net = cls.from_pretrained(str(directory), config=config, weights_only=True)
        else:
            log.warning("%s: no weights file (%s): random weights, for testing the pipeline only",
                        directory, " or ".join(WEIGHT_FILES))
            net = cls(config)
        output = self.native_output
        have = int(getattr(config, "num_labels", 0)) if output == "logits" else 0
        if num_classes == 0 and output == "logits":  # the classifier's backbone gives the embedding
            net, output = getattr(net, net.base_model_prefix), "embedding"
        elif num_classes not in (None, have):
            what = f"a {have}-class head" if have else "no classification head (a backbone)"
            raise UserError(f"{self.name}: {self.arch} has {what}; --num-classes {num_classes} does not fit it: "
                            f"leave out --num-classes, or pass 0 for the embedding")
        nc = have if output == "logits" else 0
        pre, size = self._preprocessing(img_size, config)
        call_kwargs = {}
        if size != getattr(config, "image_size", size) and \
                "interpolate_pos_encoding" in inspect.signature(net.forward).parameters:
            call_kwargs["interpolate_pos_encoding"] = True  # position embeddings resized to the asked size
        module = HFImageModel(net.eval(), output, call_kwargs)
        labels = _labels(config) if output == "logits" else None
        finish(module, img_size=size, preprocessing=pre, labels=labels, num_classes=nc, output=output)
        model = {"name": self.name, "architecture": self.arch, "model_type": self.model_type, "num_classes": nc,
                 "img_size": size, "labels": labels, "output": output, "output_dim": output_dim(module, size),
                 "params": sum(p.numel() for p in module.parameters())}
        source = {"kind": self.kind, "path": str(self.dir.resolve()), "options": {},
                  "config_sha256": sha256_file(self.dir / "config.json"),
                  "transformers_version": transformers.__version__,
                  "weights": weights_record(weights_file, sha256_file(weights_file), "transformers")
                  if weights_file else None}
        return BuiltModel(module, model, source)

    def _preprocessing(self, img_size, config) -> tuple[Preprocessing, int]:
        from ..weights import hf_preprocessing
        pp = self.dir / "preprocessor_config.json"
        if pp.is_file():
            fields = hf_preprocessing(json.loads(pp.read_text()))
        else:
            log.warning("%s: no preprocessor_config.json: ImageNet mean/std, no crop", self.dir)
            fields = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_pct": 1.0, "interpolation": "bicubic"}
        size = int(img_size or fields.get("img_size") or getattr(config, "image_size", 224))
        fields["img_size"] = size
        return Preprocessing.from_dict({**Preprocessing(img_size=size).to_dict(), **fields}), size


def _labels(config) -> list[str] | None:
    import re
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label[i]) for i in sorted(id2label)]
    if not names or all(re.fullmatch(r"LABEL_\d+", n) for n in names):
        return None
    return names
