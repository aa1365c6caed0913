"""The table of export targets and how `--target` / `--precision` select from it.

Below both the pipeline and the compile stage, so neither reaches up to the other.
"""
from __future__ import annotations

from .errors import UserError

# The runtimes each target builds for and the precisions it makes by default.
TARGETS = {
    "onnx": ((), ("fp32",)),
    "onnxruntime": (("onnxruntime",), ("fp32", "int8")),
    "openvino": (("openvino",), ("fp32", "int8")),
    "tensorrt": (("tensorrt",), ("fp16", "int8")),
    "all": (("onnxruntime", "openvino", "tensorrt"), ("fp32", "fp16", "int8")),
}
PRECISIONS = ("fp32", "fp16", "int8")


def _parse_list(value, allowed, what) -> tuple[str, ...]:
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else [x for v in value for x in str(v).split(",")]
    items = tuple(dict.fromkeys(i.strip().lower() for i in items if i.strip()))
    bad = [i for i in items if i not in allowed]
    if bad:
        raise UserError(f"unknown {what} '{bad[0]}': choose from {', '.join(allowed)}")
    return items


def plan_targets(target, precision) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Runtimes and precisions to build, from the user's --target and --precision."""
    targets = _parse_list(target or "onnx", tuple(TARGETS), "target")
    runtimes, default_prec = [], []
    for t in targets:
        runtimes += TARGETS[t][0]
        default_prec += TARGETS[t][1]
    precisions = _parse_list(precision, PRECISIONS, "precision") or tuple(dict.fromkeys(default_prec))
    if "all" not in targets and "tensorrt" not in runtimes and precision is None:
        precisions = tuple(p for p in precisions if p != "fp16")
    return tuple(dict.fromkeys(runtimes)), precisions


def wants_all(target) -> bool:
    """`--target all` builds what this machine can and skips the rest; a named runtime must be present."""
    return "all" in _parse_list(target or "onnx", tuple(TARGETS), "target")
