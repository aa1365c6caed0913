"""Checkpoint loading: find the layout of a weights file, convert it to our
(timm-compatible) parameter names, and check every tensor against the variant.

Never unpickles anything but plain tensors: torch.load(weights_only=True),
numpy with allow_pickle=False, safetensors.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError

log = logging.getLogger("vit_deploy")

HUB_PREFIX = "hf-hub:"
OWN_FORMAT = "vit-deploy"


@dataclass
class Checkpoint:
    """A state dict in our naming, plus what the file told us about the model."""
    state_dict: dict
    layout: str                      # timm | transformers | google-npz | vit-deploy
    path: Path
    sha256: str
    layer_norm_eps: float | None = None
    labels: list[str] | None = None
    preprocessing: dict = field(default_factory=dict)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------- reading files

def _read_torch(path: Path) -> dict:
    import torch
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle refusal, truncation, not a zip: all user files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise UserError(f"{path}: refusing to unpickle non-tensor objects in this checkpoint "
                            f"(only plain tensor state dicts are loaded): {first[:160]}") from None
        raise UserError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {first[:160]}") from None
    for key in ("state_dict", "model", "module", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{path}: holds no state dict of tensors")
    return obj


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from ._optional import require
    require("safetensors", f"reading {path.name}")
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def _read_npz(path: Path) -> dict:
    import torch
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: torch.from_numpy(np.array(z[k])) for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{path}: not a readable .npz checkpoint (truncated or corrupt?): {e}") from None


# ----------------------------------------------------------- layout conversion

def _strip_prefix(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def from_transformers(sd: dict) -> dict:
    """ViTForImageClassification names -> timm names (q, k, v fused into qkv)."""
    import torch
    sd = _strip_prefix(sd, "vit.")
    out, layers = {}, {}
    simple = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
        "classifier.weight": "head.weight", "classifier.bias": "head.bias",
    }
    per_layer = {
        "layernorm_before": "norm1", "layernorm_after": "norm2",
        "attention.output.dense": "attn.proj",
        "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
        # transformers >= 5 in-memory names (its save_pretrained still writes the ones above)
        "attention.o_proj": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    }
    qkv_names = {"query": "query", "key": "key", "value": "value",
                 "q_proj": "query", "k_proj": "key", "v_proj": "value"}
    for k, v in sd.items():
        if k in simple:
            out[simple[k]] = v
            continue
        m = re.match(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$", k)
        if not m:
            if k.startswith("pooler."):
                continue  # ViTModel's pooler is unused by the classifier
            out[k] = v  # reported as unexpected by the shape check
            continue
        i, name, kind = m.groups()
        qkv = re.match(r"attention\.(?:attention\.)?(query|key|value|q_proj|k_proj|v_proj)$", name)
        if qkv:
            layers.setdefault((i, kind), {})[qkv_names[qkv.group(1)]] = v
        elif name in per_layer:
            out[f"blocks.{i}.{per_layer[name]}.{kind}"] = v
        else:
            out[k] = v
    for (i, kind), parts in layers.items():
        if set(parts) != {"query", "key", "value"}:
            raise UserError(f"transformers checkpoint: layer {i} lacks one of query/key/value {kind}")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    return out


def from_google_npz(sd: dict) -> dict:
    """The original google-research/vision_transformer .npz layout -> timm names."""
    import torch
    if any(k.startswith("block1/") or "/root_block/" in k or k.startswith("conv_root") for k in sd):
        raise UserError("hybrid (ResNet) .npz checkpoints are not supported yet: load it in timm "
                        "(vit_base_r50_s16_224, pretrained_cfg file=...) and pass its state dict")
    if "pre_logits/kernel" in sd:
        raise UserError(".npz checkpoint has a pre-logits representation layer (an ImageNet-21k "
                        "pre-training checkpoint); use a fine-tuned one")
    t = lambda k: sd[k]  # noqa: E731
    out = {
        "patch_embed.proj.weight": t("embedding/kernel").permute(3, 2, 0, 1),
        "patch_embed.proj.bias": t("embedding/bias"),
        "cls_token": t("cls"),
        "pos_embed": t("Transformer/posembed_input/pos_embedding"),
        "norm.weight": t("Transformer/encoder_norm/scale"),
        "norm.bias": t("Transformer/encoder_norm/bias"),
    }
    if "head/kernel" in sd:
        out["head.weight"], out["head.bias"] = t("head/kernel").T, t("head/bias")
    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in sd:
        p = f"Transformer/encoderblock_{i}/"
        att = p + "MultiHeadDotProductAttention_1/"
        dim = t(att + "query/kernel").shape[0]
        out[f"blocks.{i}.norm1.weight"], out[f"blocks.{i}.norm1.bias"] = t(p + "LayerNorm_0/scale"), t(p + "LayerNorm_0/bias")
        out[f"blocks.{i}.norm2.weight"], out[f"blocks.{i}.norm2.bias"] = t(p + "LayerNorm_2/scale"), t(p + "LayerNorm_2/bias")
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat(
            [t(att + f"{n}/kernel").reshape(dim, -1).T for n in ("query", "key", "value")])
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([t(att + f"{n}/bias").reshape(-1) for n in ("query", "key", "value")])
        out[f"blocks.{i}.attn.proj.weight"] = t(att + "out/kernel").reshape(-1, dim).T
        out[f"blocks.{i}.attn.proj.bias"] = t(att + "out/bias")
        for j, fc in ((0, "fc1"), (1, "fc2")):
            out[f"blocks.{i}.mlp.{fc}.weight"] = t(p + f"MlpBlock_3/Dense_{j}/kernel").T
            out[f"blocks.{i}.mlp.{fc}.bias"] = t(p + f"MlpBlock_3/Dense_{j}/bias")
        i += 1
    return {k: v.contiguous() for k, v in out.items()}


def _detect(sd: dict, path: Path, meta: dict) -> str:
    keys = set(sd)
    if meta.get("format") == OWN_FORMAT:
        return OWN_FORMAT
    if "Transformer/encoder_norm/scale" in keys or "embedding/kernel" in keys:
        return "google-npz"
    if any("embeddings.patch_embeddings" in k for k in keys):
        return "transformers"
    if any(k.endswith("patch_embed.proj.weight") for k in keys):
        return "timm"
    sample = ", ".join(sorted(keys)[:3])
    raise UserError(f"{path}: unknown checkpoint layout (expected timm, transformers, Google .npz or "
                    f"vit-deploy tensors; found keys like {sample})")


def _hf_config(directory: Path) -> tuple[float | None, list[str] | None, dict]:
    cfg_path = directory / "config.json"
    eps, labels, pre = None, None, {}
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        eps = cfg.get("layer_norm_eps")
        id2label = cfg.get("id2label") or {}
        if id2label and not all(re.fullmatch(r"LABEL_\d+", str(v)) for v in id2label.values()):
            labels = [str(id2label[str(i)] if str(i) in id2label else id2label[i]) for i in range(len(id2label))]
    pp = directory / "preprocessor_config.json"
    if pp.is_file():
        pre = {k: v for k, v in hf_preprocessing(json.loads(pp.read_text())).items() if k != "img_size"}
    return eps, labels, pre


def _side(size) -> int | None:
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        return size.get("shortest_edge") or size.get("height")
    return None


def hf_preprocessing(p: dict) -> dict:
    """A transformers preprocessor_config.json as our Preprocessing fields (img_size: the crop)."""
    pre: dict = {}
    if "image_mean" in p and p.get("do_normalize", True):
        pre["mean"], pre["std"] = p["image_mean"], p["image_std"]
    elif "do_normalize" in p:
        pre["mean"], pre["std"] = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    pre["interpolation"] = {3: "bicubic", 2: "bilinear", 1: "lanczos", 0: "nearest"}.get(p.get("resample"), "bilinear")
    resize = _side(p.get("size"))
    crop = _side(p.get("crop_size")) if p.get("do_center_crop") else None
    # ViTImageProcessor resizes straight to the model size (no crop); DeiT and DINOv2's
    # processors resize the short side, then centre-crop: crop_pct is their ratio.
    pre["crop_pct"] = crop / resize if crop and resize else 1.0
    if crop or resize:
        pre["img_size"] = crop or resize
    return pre


def _resolve_hub(name: str) -> Path:
    repo = name[len(HUB_PREFIX):] if name.startswith(HUB_PREFIX) else name
    try:
        return Path(_hub_download(repo))
    except UserError:
        raise
    except Exception as e:  # offline, unknown repo, no access: all end the same way for the user
        reason = type(e).__name__
        raise UserError(f"could not fetch '{repo}' from the Hugging Face hub ({reason}; offline?): "
                        f"download it elsewhere and pass the local file with --weights PATH") from None


def _hub_download(repo: str) -> str:
    """Fetch a hub repo's weights into huggingface_hub's cache; returns its directory."""
    from ._optional import require
    require("huggingface_hub", f"fetching '{repo}' from the hub")
    from huggingface_hub import snapshot_download
    return snapshot_download(repo, allow_patterns=["*.safetensors", "*.json", "*.bin"])


def _pick_file(directory: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "model.pth"):
        if (directory / name).is_file():
            return directory / name
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".pth", ".pt", ".bin", ".npz"))
    if len(files) == 1:
        return files[0]
    raise UserError(f"{directory}: no checkpoint file found (model.safetensors, pytorch_model.bin, ...)")


@dataclass
class Tensors:
    """A weights file's tensors as stored, before any renaming."""
    state_dict: dict
    metadata: dict
    path: Path       # the file read (a directory's weights file)
    directory: Path  # where its config.json / preprocessor_config.json would be
    sha256: str


def read_tensors(weights: str | os.PathLike) -> Tensors:
    """A weights file, directory or hub name -> its tensors, read without unpickling code."""
    path = Path(weights)
    if not path.exists():
        looks_like_hub = str(weights).startswith(HUB_PREFIX) or (
            re.fullmatch(r"[\w.-]+/[\w.-]+", str(weights)) and not str(weights).startswith((".", "/")))
        if looks_like_hub:
            path = _resolve_hub(str(weights))
        else:
            raise UserError(f"weights file not found: {weights}")
    directory = path if path.is_dir() else path.parent
    if path.is_dir():
        path = _pick_file(path)
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty weights file")
    meta: dict = {}
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        sd, meta = _read_safetensors(path)
    elif suffix == ".npz":
        sd = _read_npz(path)
    else:
        sd = _read_torch(path)
    sd = {k: v for k, v in sd.items() if hasattr(v, "shape")}
    if all(k.startswith("module.") for k in sd):
        sd = _strip_prefix(sd, "module.")
    return Tensors(sd, meta, path, directory, sha256_file(path))


def read_checkpoint(weights: str | os.PathLike) -> Checkpoint:
    """Read a weights file (or directory, or hub name) into our naming."""
    t = read_tensors(weights)
    sd, meta, path, directory = t.state_dict, t.metadata, t.path, t.directory
    layout = _detect(sd, path, meta)
    eps, labels, pre = None, None, {}
    if layout == "transformers":
        eps, labels, pre = _hf_config(directory)
        eps = 1e-12 if eps is None else eps  # ViTConfig's default
        sd = from_transformers(sd)
    elif layout == "google-npz":
        sd = from_google_npz(sd)
    elif layout == OWN_FORMAT:
        labels = json.loads(meta["labels"]) if meta.get("labels") else None
        eps = float(meta["layer_norm_eps"]) if meta.get("layer_norm_eps") else None
        if meta.get("preprocessing"):
            pre = {k: v for k, v in json.loads(meta["preprocessing"]).items()
                   if k in ("crop_pct", "interpolation", "mean", "std")}
    return Checkpoint(sd, layout, path, t.sha256, eps, labels, pre)


def save_weights(model, path: str | os.PathLike, labels: list[str] | None = None, preprocessing=None) -> None:
    """Write a model's weights in vit-deploy's own layout (safetensors + metadata:
    labels and preprocessing travel with the weights)."""
    from safetensors.torch import save_file
    meta = {"format": OWN_FORMAT, "model": model.spec.name,
            "layer_norm_eps": str(model.norm.eps), "img_size": str(model.img_size)}
    labels = labels or getattr(model, "labels", None)
    if labels:
        meta["labels"] = json.dumps(labels)
    pre = preprocessing or getattr(model, "preprocessing", None)
    if pre is not None:
        meta["preprocessing"] = json.dumps(pre.to_dict() if hasattr(pre, "to_dict") else pre)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    from .atomic import atomic_path
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=meta)


# ------------------------------------------------------------------ applying

def checkpoint_num_classes(sd: dict) -> int | None:
    w = sd.get("head.weight")
    return int(w.shape[0]) if w is not None else None


def checkpoint_img_size(sd: dict, stride: int) -> int | None:
    pe = sd.get("pos_embed")
    if pe is None:
        return None
    grid = int(round((pe.shape[1] - 1) ** 0.5))
    return grid * stride if grid * grid == pe.shape[1] - 1 else None


def resample_pos_embed(pos_embed, new_grid: int):
    """Bicubic resize of the patch position grid; the class-token position is kept."""
    import torch.nn.functional as F
    import torch
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    old = int(round(grid.shape[1] ** 0.5))
    d = grid.shape[-1]
    grid = grid.reshape(1, old, old, d).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False, antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, d)
    return torch.cat([cls, grid.to(pos_embed.dtype)], dim=1)


def _fit_head(sd: dict, target: dict, model, ckpt: Checkpoint) -> None:
    """A head fits when it has the asked class count; the model without one (num_classes 0)
    drops it. Anything else is the user's mismatch: both shapes are named."""
    have, want = sd.get("head.weight"), target.get("head.weight")
    if want is None:  # embedding model: the checkpoint's head, if any, is not used
        if have is not None:
            log.info("checkpoint head %s is dropped: the model outputs its embedding", list(have.shape))
        sd.pop("head.weight", None)
        sd.pop("head.bias", None)
        return
    if have is not None and tuple(have.shape[1:]) != tuple(want.shape[1:]):
        return  # another variant's head: the tensor-by-tensor check below names the misfit
    if have is None or tuple(have.shape) != tuple(want.shape):
        got = f"a head {list(have.shape)}" if have is not None else "no head (headless: the embedding only)"
        raise UserError(f"{ckpt.path}: the checkpoint has {got}, {model.num_classes} classes need "
                        f"{list(want.shape)}; leave out --num-classes to use the checkpoint's own head, "
                        f"or pass --num-classes 0 for its embedding")


def apply_checkpoint(model, ckpt: Checkpoint) -> None:
    """Load `ckpt` into `model`, checking every tensor; names the first misfit."""
    sd = dict(ckpt.state_dict)
    target = model.state_dict()
    name = model.spec.name
    if "pos_embed" in sd and sd["pos_embed"].shape != target["pos_embed"].shape \
            and sd["pos_embed"].shape[-1] == target["pos_embed"].shape[-1]:
        log.info("resampling position embedding %s -> %s", tuple(sd["pos_embed"].shape),
                 tuple(target["pos_embed"].shape))
        sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], model.grid_size)
    _fit_head(sd, target, model, ckpt)
    for k, v in target.items():
        if k not in sd:
            raise UserError(f"{ckpt.path}: weights do not fit {name}: tensor '{k}' {list(v.shape)} is missing "
                            f"from the {ckpt.layout} checkpoint")
    load_checked(model, sd, target, f"{ckpt.path}: weights do not fit {name}")


def load_checked(model, sd: dict, target: dict, where: str) -> None:
    """Load `sd` (every tensor of `target` present) into `model` after checking shapes and
    extra tensors; a mismatch is one line starting with `where`."""
    for k, v in target.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise UserError(f"{where}: tensor '{k}' has shape {list(sd[k].shape)} in the checkpoint, "
                            f"{list(v.shape)} in the model")
    extra = [k for k in sd if k not in target]
    if extra:
        raise UserError(f"{where}: unexpected tensor '{extra[0]}' {list(sd[extra[0]].shape)} "
                        f"(and {len(extra) - 1} more)")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
