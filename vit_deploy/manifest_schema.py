"""The one schema of manifest.json, checked every time a bundle is opened.

A bundle copied from elsewhere is input someone else wrote: every field the code
reads is checked here for type, range and known values, so that a bad manifest
ends with one line naming the field instead of a traceback deep in a stage.
Unknown extra keys are allowed (newer writers may add fields); missing or
malformed known ones are not.

A schema node is a function (value, field) -> None that raises Invalid.
"""
from __future__ import annotations

import math
import posixpath
import re

# The runtimes that have artifacts in a bundle (torch is the reference, it has none).
ARTIFACT_BACKENDS = ("onnx", "onnxruntime", "openvino", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
METRICS = ("max_abs", "min_cosine", "top1_agreement")
# Generous bounds: they exist to refuse nonsense (negative, absurd), not unusual models.
MAX_BATCH = 65536
MAX_IMG_SIZE = 8192
MAX_CLASSES = 1_000_000
MAX_ARTIFACTS = 256
MAX_LIST = 1_000_000
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class Invalid(ValueError):
    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


def _show(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def bundle_relative(value, field: str = "path") -> str:
    """A path inside the bundle: relative, POSIX separators, no '..', no empty or odd parts.
    (Where it resolves to, symlinks followed, is checked against the disk by bundle.py.)"""
    if not isinstance(value, str) or not value:
        raise Invalid(field, f"must be a non-empty relative path, got {_show(value)}")
    if "\x00" in value or "\\" in value or len(value) > 1024:
        raise Invalid(field, f"not a usable path: {_show(value)}")
    shown = _show(value, 300)
    if value.startswith("/") or re.match(r"^[A-Za-z]:", value):
        raise Invalid(field, f"absolute path {shown} refused: a bundle may only name files inside itself")
    parts = value.split("/")
    if ".." in parts:
        raise Invalid(field, f"path {shown} refused: '..' leaves the bundle")
    if any(p in ("", ".") for p in parts) or posixpath.normpath(value) != value:
        raise Invalid(field, f"path {shown} is not in normal form (like 'openvino/model.xml')")
    return value


# ----------------------------------------------------------------- node builders

def integer(lo: int, hi: int):
    def check(v, field):
        if not isinstance(v, int) or isinstance(v, bool):
            raise Invalid(field, f"must be an integer, got {_show(v)}")
        if not lo <= v <= hi:
            raise Invalid(field, f"must be between {lo} and {hi}, got {v}")
    return check


def number(lo: float = -math.inf, hi: float = math.inf, finite: bool = False, above: float | None = None):
    def check(v, field):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise Invalid(field, f"must be a number, got {_show(v)}")
        if finite and not math.isfinite(v):
            raise Invalid(field, f"must be a finite number, got {v}")
        if above is not None and not v > above:
            raise Invalid(field, f"must be above {above}, got {v}")
        if not math.isnan(v) and not lo <= v <= hi:
            raise Invalid(field, f"must be between {lo} and {hi}, got {v}")
    return check


def string(choices: tuple[str, ...] | None = None, max_len: int = 4096):
    def check(v, field):
        if not isinstance(v, str):
            raise Invalid(field, f"must be a string, got {_show(v)}")
        if len(v) > max_len:
            raise Invalid(field, f"longer than {max_len} characters")
        if choices is not None and v not in choices:
            raise Invalid(field, f"must be one of {', '.join(choices)}, got {_show(v)}")
    return check


def boolean(v, field):
    if not isinstance(v, bool):
        raise Invalid(field, f"must be true or false, got {_show(v)}")


def sha256(v, field):
    if not isinstance(v, str) or not _SHA256.match(v):
        raise Invalid(field, f"must be a sha256 hex digest (64 lowercase hex digits), got {_show(v)}")


def rel_path(v, field):
    bundle_relative(v, field)


def file_name(v, field):
    """A bare file name (no directory part), e.g. the held-out calibration photos."""
    if not isinstance(v, str) or not v or "/" in v or "\\" in v or "\x00" in v or v in (".", ".."):
        raise Invalid(field, f"must be a plain file name, got {_show(v)}")


def nullable(node):
    def check(v, field):
        if v is not None:
            node(v, field)
    return check


def list_of(node, max_len: int = MAX_LIST, min_len: int = 0):
    def check(v, field):
        if not isinstance(v, list):
            raise Invalid(field, f"must be a list, got {_show(v)}")
        if not min_len <= len(v) <= max_len:
            raise Invalid(field, f"must hold {min_len} to {max_len} items, has {len(v)}")
        for i, item in enumerate(v):
            node(item, f"{field}[{i}]")
    return check


def mapping(value_node, key_node=None, max_len: int = MAX_LIST, min_len: int = 0):
    def check(v, field):
        if not isinstance(v, dict):
            raise Invalid(field, f"must be an object, got {_show(v)}")
        if not min_len <= len(v) <= max_len:
            raise Invalid(field, f"must hold {min_len} to {max_len} entries, has {len(v)}")
        for k, item in v.items():
            if key_node:
                key_node(k, f"{field} key {k!r}")
            value_node(item, f"{field}[{k!r}]")
    return check


def record(required: dict, optional: dict | None = None):
    optional = optional or {}

    def check(v, field):
        if not isinstance(v, dict):
            raise Invalid(field, f"must be an object, got {_show(v)}")
        for k, node in required.items():
            if k not in v:
                raise Invalid(f"{field}.{k}" if field else k, "is missing")
            node(v[k], f"{field}.{k}" if field else k)
        for k, node in optional.items():
            if k in v:
                node(v[k], f"{field}.{k}" if field else k)
    return check


# ----------------------------------------------------------------- the schema

_name = string(max_len=256)
_text = string()

QUANTIZATION = record(
    required={"method": _name, "calibration_dir": _text,
              "calibration_images": list_of(_text), "held_out_images": list_of(file_name),
              "quantized_nodes": integer(0, MAX_LIST)},
    optional={"scheme": _text, "excluded_nodes": list_of(_text), "agreement": nullable(number(0, 1)),
              "overflow_fix": _name, "seven_bit_weights": list_of(_text),
              "smoothquant": _name, "smoothed_layernorms": integer(0, MAX_LIST),
              "smoothed_products": integer(0, MAX_LIST),
              "bias_corrected": integer(0, MAX_LIST), "gptq_weights": integer(0, MAX_LIST),
              "attention_products": integer(0, MAX_LIST),
              "recipe": string(("smoothquant", "plain")),
              "recipe_scores": mapping(record(required={"worst": number(-1, 1, finite=True),
                                                        "mean": number(-1, 1, finite=True)}),
                                       key_node=string(("smoothquant", "plain")), max_len=2),
              # the written file on the recipe choice's images, where measured; the guard's products in float
              "selection_correlation": record(required={}, optional={"worst": number(-1, 1, finite=True),
                                                                       "mean": number(-1, 1, finite=True)}),
              "returned_to_float": list_of(_text)})

ARTIFACT = record(
    required={"backend": string(ARTIFACT_BACKENDS), "precision": string(PRECISIONS), "path": rel_path,
              "sha256": sha256},
    optional={"files": mapping(sha256, key_node=rel_path, min_len=1, max_len=1024), "source": _text,
              "source_sha256": sha256, "cache_key": _text, "device": nullable(_text),
              "max_batch": integer(1, MAX_BATCH), "opset": integer(1, 1000), "quantization": QUANTIZATION,
              "exporter": string(("torchscript", "dynamo")),
              "extra_files": list_of(rel_path, max_len=1024), "runtime_version": _text,
              # passed to OpenVINO as INFERENCE_PRECISION_HINT ("half": the CPU's own half type)
              "inference_precision_hint": string(("f32", "bf16", "f16", "half")),
              "performance_hint": string(("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT"))})

MODEL = record(
    # num_classes 0: the model gives its pooled embedding (output "embedding", output_dim wide)
    required={"name": _name, "img_size": integer(8, MAX_IMG_SIZE), "num_classes": integer(0, MAX_CLASSES)},
    optional={"labels": nullable(list_of(_text, max_len=MAX_CLASSES)),
              "output": string(("logits", "embedding")), "output_dim": integer(1, MAX_CLASSES),
              "patch_size": integer(1, 1024), "layers": integer(1, 1024), "hidden_size": integer(1, 65536),
              "mlp_size": integer(1, 262144), "heads": integer(1, 1024),
              "backbone_layers": list_of(integer(1, 1024), max_len=16), "timm_name": _name, "hf_name": _name,
              "layer_norm_eps": number(0, 1, finite=True)})

_channel = number(-1e6, 1e6, finite=True)
PREPROCESSING = record(
    required={"img_size": integer(8, MAX_IMG_SIZE), "crop_pct": number(0, 1, finite=True, above=0.05),
              "interpolation": _name,
              "mean": list_of(_channel, min_len=3, max_len=3),
              "std": list_of(number(1e-6, 1e6, finite=True), min_len=3, max_len=3),
              "resize_size": integer(1, 8 * MAX_IMG_SIZE)})

SOURCE = record(
    required={},
    optional={"weights": nullable(record(required={"path": _text, "sha256": sha256, "layout": _name})),
              "seed": integer(0, 2**63 - 1)})

_result = record(required={"passed": boolean, "max_abs": number(0), "min_cosine": number(-1.001, 1.001),
                           "top1_agreement": nullable(number(0, 1))})  # None for embedding outputs
PARITY = record(
    required={"passed": boolean, "reference": _text, "images": integer(0, MAX_LIST), "checked": _text,
              "results": mapping(_result, max_len=1024)},
    optional={"note": nullable(_text)})

LATENCY = record(
    required={},
    optional={"measured": _text, "machine": _text, "reference": nullable(_text),
              "threads": nullable(integer(1, 4096)),
              "results": list_of(record(required={"artifact": _text, "batch": integer(1, MAX_BATCH),
                                                  "p50_ms": number(0), "throughput": number(0)}),
                                 max_len=100_000)})

THRESHOLD_SET = mapping(record(required={}, optional={m: number(-1e6, 1e6, finite=True) for m in METRICS}),
                        key_node=string(PRECISIONS), max_len=len(PRECISIONS))

MANIFEST = record(
    required={"format_version": integer(1, 1), "artifacts": list_of(ARTIFACT, max_len=MAX_ARTIFACTS),
              "model": MODEL, "preprocessing": PREPROCESSING, "source": SOURCE},
    optional={"max_batch": integer(1, MAX_BATCH), "thresholds": THRESHOLD_SET, "parity": nullable(PARITY),
              "latency": nullable(LATENCY),
              "last_export": nullable(record(required={"stage_seconds": mapping(number(0), max_len=1024)})),
              "skipped_targets": nullable(list_of(record(required={"runtime": _text, "reason": _text}),
                                                  max_len=64))})


def _check_artifacts(artifacts: list) -> None:
    """What one artifact's fields cannot say alone: its files, suffixes, and no duplicates."""
    seen, paths = {}, {}
    for i, a in enumerate(artifacts):
        field = f"artifacts[{i}]"
        name = f"{a['backend']}-{a['precision']}"
        if name in seen:
            raise Invalid(field, f"{name} is listed twice (also artifacts[{seen[name]}])")
        seen[name] = i
        # one file is one artifact: a second entry for it could only relabel it (INT8 called FP32)
        if a["path"] in paths:
            raise Invalid(f"{field}.path", f"{a['path']!r} is already artifacts[{paths[a['path']]}]")
        paths[a["path"]] = i
        files = a.get("files", {a["path"]: a["sha256"]})
        if a["path"] not in files:
            raise Invalid(f"{field}.files", f"does not list the artifact's own path {a['path']!r}")
        if files[a["path"]] != a["sha256"]:
            raise Invalid(f"{field}.sha256", f"differs from files[{a['path']!r}]")
        if a["backend"] in ("onnx", "onnxruntime") and not a["path"].endswith(".onnx"):
            raise Invalid(f"{field}.path", f"an {a['backend']} artifact must be a .onnx file, got {a['path']!r}")
        if a["backend"] == "openvino":
            if not a["path"].endswith(".xml"):
                raise Invalid(f"{field}.path", f"an openvino artifact must be an IR .xml file, got {a['path']!r}")
            weights = a["path"][:-4] + ".bin"  # OpenVINO reads the .bin beside the .xml by name
            if weights not in files:
                raise Invalid(f"{field}.files", f"must list the IR weights {weights!r} so that they are checked")


def validate(manifest) -> None:
    """Raise Invalid naming the first field that breaks the schema."""
    MANIFEST(manifest, "")
    _check_artifacts(manifest["artifacts"])
    model, pre = manifest["model"], manifest["preprocessing"]
    if pre["img_size"] != model["img_size"]:
        raise Invalid("preprocessing.img_size", f"{pre['img_size']} differs from model.img_size {model['img_size']}")
    labels = model.get("labels")
    if labels is not None and model["num_classes"] and len(labels) != model["num_classes"]:
        raise Invalid("model.labels", f"has {len(labels)} names for {model['num_classes']} classes")
