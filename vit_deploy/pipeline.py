"""`vit-deploy export`: build -> export -> simplify -> [quantize] -> compile -> check.

One plain function per stage, each reading and extending the bundle's manifest.
A stage whose inputs (weights hash, options, tool versions, upstream artifact
hashes) are unchanged is reused, and says so; force=True rebuilds.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from .bundle import FORMAT_VERSION, Bundle, Transaction
from .errors import UserError
from .zoo import get_spec, spec_dict

log = logging.getLogger("vit_deploy")

# One table of targets: the runtimes each builds for and the precisions it makes by default.
TARGETS = {
    "onnx": ((), ("fp32",)),
    "onnxruntime": (("onnxruntime",), ("fp32", "int8")),
    "openvino": (("openvino",), ("fp32", "int8")),
    "tensorrt": (("tensorrt",), ("fp16", "int8")),
    "all": (("onnxruntime", "openvino", "tensorrt"), ("fp32", "fp16", "int8")),
}
PRECISIONS = ("fp32", "fp16", "int8")
SEED = 0  # random weights (no checkpoint) are drawn from this seed, so check can rebuild them


class Stages:
    """Prints each stage with its time; quiet for scripts."""

    def __init__(self, quiet: bool = False):
        self.quiet, self.times = quiet, {}

    def run(self, name: str, fn, *args, **kwargs):
        t = time.perf_counter()
        result = fn(*args, **kwargs)
        self.times[name] = round(time.perf_counter() - t, 2)
        if not self.quiet:
            log.info("[%s] %.1f s", name, self.times[name])
        return result


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


def _model_section(model, spec) -> dict:
    return {**spec_dict(spec), "num_classes": model.num_classes, "img_size": model.img_size,
            "layer_norm_eps": model.norm.eps, "labels": model.labels}


def build_reference(manifest: dict, weights=None):
    """The PyTorch model a bundle was made from (its weights verified by hash)."""
    from ._optional import require_torch
    torch = require_torch("the PyTorch reference")

    from .models import build_model
    from .weights import read_checkpoint

    src = manifest["source"]
    m = manifest["model"]
    ckpt = None
    path = weights or (src.get("weights") or {}).get("path")
    if path:
        ckpt = read_checkpoint(path)
        want = src["weights"]["sha256"]
        if ckpt.sha256 != want:
            raise UserError(f"{ckpt.path}: sha256 differs from the weights the bundle was built from; "
                            f"pass the original file with --weights")
    torch.manual_seed(src.get("seed", SEED))
    return build_model(m["name"], num_classes=m["num_classes"], img_size=m["img_size"], checkpoint=ckpt)


def stage_onnx(tx: Transaction, model, opset: int, simplify: bool, force: bool, stages: Stages) -> dict:
    from . import onnx_export as ex
    from .versions import cache_key, tool_versions

    versions = tool_versions("torch", "onnx", "onnxsim", "onnxruntime")
    m = tx.manifest
    key = cache_key(model=m["model"], pre=m["preprocessing"], source=m["source"], opset=opset,
                    simplify=simplify, versions=versions)
    old = tx.bundle.reusable("onnx", "fp32", key, force)
    if old:
        return old
    meta = {"model": m["model"]["name"], "num_classes": m["model"]["num_classes"],
            "preprocessing": m["preprocessing"], "labels": m["model"]["labels"],
            "weights_sha256": (m["source"].get("weights") or {}).get("sha256"), "versions": versions}
    path = tx.stage("model.onnx")
    stages.run("export", ex.export_onnx, model, path, opset, meta)
    note, ok = "skipped (--no-simplify)", False
    if simplify:
        ok, note = stages.run("simplify", ex.simplify_onnx, path)
        if not ok:
            log.warning("keeping the unsimplified model: %s", note)
    verification = stages.run("verify", ex.verify_onnx, path, model)
    from . import onnx_io
    entry = {"backend": "onnx", "precision": "fp32", "opset": opset, "simplified": ok,
             "simplify_note": note, "verification": verification, "cache_key": key, "versions": versions}
    return tx.add_artifact(entry, onnx_io.files_of(path))


def export(model: str = "vit-b16", target: str = "onnx", precision=None, weights=None,
           num_classes: int | None = None, img_size: int | None = None, opset: int = 17,
           max_batch: int = 32, out: str | Path = "models", simplify: bool = True,
           calib_dir=None, calib_size: int = 32, calib_method: str = "percentile", overflow_fix: str = "auto",
           device: str = "CPU", opt_batch: int = 1, workspace_mb: int = 2048, dla_core: int | None = None,
           check: bool = True, force: bool = False, quiet: bool = False) -> dict:
    """Run the whole pipeline into the bundle `<out>/<model>/`; returns its manifest."""
    from ._optional import require, require_torch
    require_torch("export")
    if simplify:
        require("onnxsim", "export", "pass --no-simplify")
    from . import onnx_export as ex
    from .models import build_model
    from .weights import read_checkpoint

    spec = get_spec(model)
    ex.check_opset(opset)
    if max_batch < 1:
        raise UserError(f"--max-batch must be at least 1, got {max_batch}")
    runtimes, precisions = plan_targets(target, precision)
    from .backends import require_runtimes
    runtimes, skipped = require_runtimes(runtimes, skip_missing=wants_all(target))
    if "int8" in precisions:  # fail on bad calibration input before any work
        from .quantize import resolve_overflow_fix
        resolve_overflow_fix(overflow_fix)
        from .images import default_calibration_dir, list_images
        list_images(calib_dir or default_calibration_dir())
    stages = Stages(quiet)
    bundle_dir = Path(out) / model
    with Bundle.writing(bundle_dir) as tx:
        import torch
        ckpt = stages.run("read weights", read_checkpoint, weights) if weights is not None else None
        torch.manual_seed(SEED)
        net = stages.run("build", build_model, model, num_classes, img_size, checkpoint=ckpt)
        m = tx.manifest
        m.update({
            "format_version": FORMAT_VERSION,
            "model": _model_section(net, spec),
            "preprocessing": net.preprocessing.to_dict(),
            "source": {"weights": {"path": str(Path(ckpt.path).resolve()), "sha256": ckpt.sha256,
                                   "layout": ckpt.layout} if ckpt else None,
                       "seed": SEED},
            "max_batch": max_batch,
        })
        m.setdefault("artifacts", [])
        stage_onnx(tx, net, opset, simplify, force, stages)
        tx.commit()
        if "int8" in precisions:
            from .quantize import stage_quantize
            stage_quantize(tx, calib_dir, calib_size, calib_method, force, stages, overflow_fix=overflow_fix,
                           runtimes=runtimes)
            tx.commit()
        if runtimes:
            from .compile import stage_compile
            stage_compile(tx, runtimes, precisions, max_batch=max_batch, device=device, force=force, stages=stages,
                          opt_batch=opt_batch, workspace_mb=workspace_mb, dla_core=dla_core)
            tx.commit()
        if skipped:
            m["skipped_targets"] = skipped
        else:
            m.pop("skipped_targets", None)
        if check:
            from .parity import stage_check
            stages.run("check", stage_check, tx, net)
        m["last_export"] = {"stage_seconds": stages.times, "targets": list(runtimes), "precisions": list(precisions),
                            "skipped": skipped}
        tx.commit()
        return m
