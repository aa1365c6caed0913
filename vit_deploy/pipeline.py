"""`vit-deploy export`: build -> export -> simplify -> [quantize] -> compile -> check.

One plain function per stage, each reading and extending the bundle's manifest.
A stage whose inputs (weights hash, options, tool versions, upstream artifact
hashes) are unchanged is reused, and says so; force=True rebuilds.
The model comes from a source (vit_deploy.sources: the zoo, timm, a Hugging Face
directory); the stages below never import this module.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .bundle import FORMAT_VERSION, Bundle, Transaction
from .errors import UserError
from .sources import SEED, build_reference, resolve
from .stages import Stages
from .targets import PRECISIONS, TARGETS, plan_targets, wants_all

log = logging.getLogger("vit_deploy")
__all__ = ["export", "stage_onnx", "build_reference", "Stages", "plan_targets", "wants_all", "TARGETS",
           "PRECISIONS", "SEED"]
KEEP_REFERENCE_BYTES = 1 << 30  # larger PyTorch references are rebuilt for the check


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
    meta = {"model": m["model"]["name"], "num_classes": m["model"]["num_classes"], "output": m["model"]["output"],
            "preprocessing": m["preprocessing"], "labels": m["model"]["labels"],
            "weights_sha256": (m["source"].get("weights") or {}).get("sha256"), "versions": versions}
    path = tx.stage("model.onnx")
    traced = stages.run("export", ex.export_onnx, model, path, opset, meta)
    note, ok = "skipped (--no-simplify)", False
    if simplify:
        ok, note = stages.run("simplify", ex.simplify_onnx, path)
        if not ok:
            log.warning("keeping the unsimplified model: %s", note)
    verification = stages.run("verify", ex.verify_onnx, path, model, trace_warnings=traced.warnings,
                              model_name=m["model"]["name"])
    from . import onnx_io
    entry = {"backend": "onnx", "precision": "fp32", "opset": traced.opset, "exporter": traced.exporter,
             "simplified": ok, "simplify_note": note, "verification": verification, "cache_key": key,
             "versions": versions}
    return tx.add_artifact(entry, onnx_io.files_of(path))


def export(model: str = "vit-b16", target: str = "onnx", precision=None, weights=None,
           num_classes: int | None = None, img_size: int | None = None, opset: int = 17,
           max_batch: int = 32, out: str | Path = "models", simplify: bool = True,
           calib_dir=None, calib_size: int = 32, calib_method: str = "mse", overflow_fix: str = "auto",
           device: str = "CPU", opt_batch: int = 1, workspace_mb: int = 2048, dla_core: int | None = None,
           check: bool = True, force: bool = False, quiet: bool = False, model_args: dict | None = None) -> dict:
    """Run the whole pipeline into the bundle `<out>/<name>/`; returns its manifest.

    `model` is a zoo name, `timm:NAME` or a Hugging Face model directory (`hf:DIR`);
    `model_args` are keyword arguments for timm's constructor (e.g. depth=2).
    num_classes=0 gives an embedding bundle (the pooled features, no head).
    """
    from . import onnx_export as ex
    from ._optional import require, require_torch

    require_torch("export")  # before any work: a core install (no torch) gets one line naming the extra
    if simplify:
        require("onnxsim", "export", "pass --no-simplify")
    source = resolve(model)
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
    bundle_dir = Path(out) / source.bundle_name
    with Bundle.writing(bundle_dir) as tx:
        import torch
        torch.manual_seed(SEED)
        built = stages.run("build", source.build, num_classes, img_size, weights, dict(model_args or {}))
        net = built.module
        m = tx.manifest
        m.update({
            "format_version": FORMAT_VERSION,
            "model": built.model,
            "preprocessing": net.preprocessing.to_dict(),
            "source": {**built.source, "seed": SEED},
            "max_batch": max_batch,
        })
        m.setdefault("artifacts", [])
        stage_onnx(tx, net, opset, simplify, force, stages)
        tx.commit()
        if sum(p.numel() * p.element_size() for p in net.parameters()) > KEEP_REFERENCE_BYTES:
            # vit-h14 and the like: not kept through quantize and compile (2.5 GB of peak
            # memory); check rebuilds it from the manifest (same seed, weights hash-checked)
            del built, net
            net = None
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
        m["last_export"] = {"stage_seconds": stages.times, "peak_rss_gb_after": stages.peak_rss_gb,
                            "targets": list(runtimes), "precisions": list(precisions), "skipped": skipped}
        tx.commit()
        return m
