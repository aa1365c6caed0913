"""Where a model comes from: the built-in zoo, timm (`timm:NAME`) or a Hugging Face
model directory (`hf:DIR`, or any directory holding a config.json).

Every source answers the same small interface (`ModelSource.build`), so the
pipeline has no branch per source: it gets back the eval-mode module, its
preprocessing, labels and output kind, and the two manifest sections that let
`check` rebuild the very same reference later (`build_reference`).
Nothing here imports torch, timm or transformers until a timm or Hugging Face model is named.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import UserError

SEED = 0  # random weights (no checkpoint) are drawn from this seed, so check can rebuild them
OUTPUTS = ("logits", "embedding")  # [batch, classes] or the pooled [batch, hidden]
TIMM_PREFIX, HF_PREFIX = "timm:", "hf:"
OTHER_SOURCES = """
Beyond the zoo (--model):
  timm:NAME   any timm model, e.g. timm:deit_small_distilled_patch16_224, timm:vit_small_patch14_reg4_dinov2,
              timm:swin_tiny_patch4_window7_224, timm:mobilevit_s (pip install 'vit-deploy[timm]');
              weights from --weights FILE (.safetensors preferred) or --weights pretrained (timm's hub, online);
              constructor arguments with --model-arg KEY=VALUE
  hf:DIR      a Hugging Face model directory (config.json + weights), e.g. ViTForImageClassification,
              DeiTForImageClassificationWithTeacher, Dinov2Model, Dinov2ForImageClassification
              (pip install 'vit-deploy[hf]'); preprocessing from its preprocessor_config.json
  --num-classes 0 with any of them: the pooled embedding instead of logits (also a headless checkpoint's default)"""


@dataclass
class BuiltModel:
    """What a source hands to the pipeline.

    `module` maps a float32 NCHW batch to one float32 tensor and carries the
    attributes the stages read: img_size, preprocessing, labels, num_classes, output.
    """
    module: Any
    model: dict   # the manifest's "model" section
    source: dict  # the manifest's "source" section: kind, options, weights (path, sha256, layout), seed


class ModelSource(Protocol):
    kind: str         # "zoo" | "timm" | "hf", recorded as source.kind
    name: str         # what --model named, recorded as model.name
    bundle_name: str  # the bundle directory under --out

    def build(self, num_classes: int | None, img_size: int | None, weights, options: dict) -> BuiltModel:
        """The eval-mode model. num_classes None: what the weights say (none: headless), else
        the source's default; 0: the pooled embedding. Random weights unless `weights`."""
        ...


def resolve(model: str) -> ModelSource:
    """The source a --model value names."""
    model = str(model)
    if model.startswith(TIMM_PREFIX):
        from .timm_source import TimmSource
        return TimmSource(model[len(TIMM_PREFIX):])
    if model.startswith(HF_PREFIX) or (Path(model) / "config.json").is_file():
        from .hf_source import HFSource
        return HFSource(model[len(HF_PREFIX):] if model.startswith(HF_PREFIX) else model)
    from .zoo_source import ZooSource
    return ZooSource(model)


def bundle_name(model: str) -> str:
    """The bundle directory `vit-deploy export --model MODEL` writes under --out."""
    return resolve(model).bundle_name


def finish(module, *, img_size: int, preprocessing, labels, num_classes: int, output: str):
    """Attach what the stages read to an eval-mode, gradient-free module."""
    assert output in OUTPUTS, output
    module.img_size, module.preprocessing, module.labels = img_size, preprocessing, labels
    module.num_classes, module.output = num_classes, output
    return module.eval().requires_grad_(False)


def output_dim(module, img_size: int) -> int:
    """The width of the model's output, from one forward pass on a blank image."""
    import torch
    try:
        with torch.no_grad():
            return int(module(torch.zeros(1, 3, img_size, img_size)).shape[-1])
    except (RuntimeError, ValueError, AssertionError) as e:  # mostly a size the model cannot take
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"the model does not run on {img_size} px images ({first}); try another --img-size") from None


def weights_record(path, sha256: str, layout: str) -> dict:
    return {"path": str(Path(path).resolve()), "sha256": sha256, "layout": layout}


def build_reference(manifest: dict, weights=None):
    """The PyTorch model a bundle was made from, rebuilt from its manifest (weights verified by hash)."""
    import torch

    src, m = manifest["source"], manifest["model"]
    recorded = src.get("weights")
    path = weights or (recorded or {}).get("path")
    source = resolve(_recorded_model(src, m))
    checked = recorded and path and Path(path).is_file()
    if checked:  # before building: a different file must not get as far as a shape mismatch
        from ..weights import sha256_file
        _same_weights(path, sha256_file(path), recorded)
    torch.manual_seed(src.get("seed", SEED))
    built = source.build(m["num_classes"], m["img_size"], path, src.get("options") or {})
    if recorded and not checked:  # a directory or hub name: the file it resolved to
        _same_weights(path, (built.source.get("weights") or {}).get("sha256"), recorded)
    if src.get("config_sha256") and built.source.get("config_sha256") != src["config_sha256"]:
        raise UserError(f"{src.get('path')}: config.json changed since the bundle was built; export it again")
    return built.module


def _same_weights(path, sha256, recorded: dict) -> None:
    if sha256 != recorded["sha256"]:
        raise UserError(f"{path}: sha256 differs from the weights the bundle was built from; "
                        f"pass the original file with --weights")


def _recorded_model(src: dict, m: dict) -> str:
    kind = src.get("kind", "zoo")  # bundles from before sources existed are zoo models
    if kind == "zoo":
        return m["name"]
    if kind == "timm":
        return TIMM_PREFIX + src["name"]
    if kind == "hf":
        return HF_PREFIX + src["path"]
    raise UserError(f"manifest names an unknown model source '{kind}'")
