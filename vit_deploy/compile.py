"""Stage: the bundle's ONNX files -> one artifact per runtime and precision."""
from __future__ import annotations

import logging
from pathlib import Path

from .backends import backend, require_runtimes
from .bundle import Bundle
from .errors import UserError

log = logging.getLogger("vit_deploy")

# What each runtime builds for each precision, from which ONNX precision, and the file name.
RECIPES = {
    ("onnxruntime", "fp32"): ("fp32", "model.ort.onnx"),
    ("onnxruntime", "int8"): ("int8", "model.int8.ort.onnx"),
    ("openvino", "fp32"): ("fp32", "openvino/model.fp32.xml"),
    ("openvino", "fp16"): ("fp32", "openvino/model.fp16.xml"),
    ("openvino", "int8"): ("int8", "openvino/model.int8.xml"),
    ("tensorrt", "fp32"): ("fp32", "tensorrt/model.fp32.engine"),
    ("tensorrt", "fp16"): ("fp16", "tensorrt/model.fp16.engine"),  # strongly typed: FP16 types in the ONNX
    ("tensorrt", "int8"): ("int8", "tensorrt/model.int8.engine"),
}
NOT_BUILT = {("onnxruntime", "fp16"): "ONNX Runtime's CPU provider has no fast FP16 kernels"}


def stage_compile(tx, runtimes, precisions, *, max_batch: int, device: str = "CPU", force: bool = False,
                  stages=None, opt_batch: int = 1, workspace_mb: int = 2048, dla_core: int | None = None,
                  threads: int | None = None, strict: bool = True) -> list[dict]:
    from .versions import cache_key, version_of

    bundle = tx.bundle
    built = []
    for runtime in runtimes:
        mod = backend(runtime)
        for precision in precisions:
            if (runtime, precision) in NOT_BUILT:
                log.info("[compile] %s %s skipped: %s", runtime, precision, NOT_BUILT[(runtime, precision)])
                continue
            src_precision, rel = RECIPES[(runtime, precision)]
            src = bundle.find("onnx", src_precision)
            fp32 = bundle.find("onnx", "fp32")
            if src_precision == "fp16" and fp32 and (src is None or src.get("source_sha256") != fp32["sha256"]):
                src = stage_fp16_onnx(tx, stages)  # made on demand, remade when model.onnx changed
                tx.commit()  # later stages read it from the bundle
            if src is None and not strict:
                log.info("[compile] %s %s skipped: the bundle has no %s ONNX", runtime, precision, src_precision)
                continue
            if src is None:
                raise UserError(f"{bundle.dir}: has no {src_precision} ONNX to build {runtime} {precision} from; "
                                f"export with --precision {src_precision}")
            options = {"max_batch": max_batch, "device": device, "img_size": bundle.manifest["model"]["img_size"],
                       "opt_batch": opt_batch, "workspace_mb": workspace_mb, "dla_core": dla_core,
                       "threads": threads, "bundle_dir": str(bundle.dir)}
            # FORMS: the rewrite a backend applies to its source (a new one rebuilds old artifacts)
            form = {"form": f} if (f := getattr(mod, "FORMS", {}).get(precision)) else {}
            key = cache_key(src=src["sha256"], runtime=runtime, precision=precision, version=version_of(
                {"onnxruntime": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}[runtime]),
                options={k: v for k, v in options.items() if k not in ("bundle_dir", "threads")}, **form)
            old = bundle.reusable(runtime, precision, key, force)
            if old:
                built.append(old)
                continue
            src_path = bundle.verify(src)
            out = tx.stage(rel)
            label = f"compile {runtime} {precision}"
            run = stages.run if stages else (lambda _n, f, *a, **k: f(*a, **k))
            files, extras = run(label, mod.compile, src_path, out, precision, options)
            prefix = str(Path(rel).parent)
            rels = [f if prefix == "." else f"{prefix}/{f}" for f in files]
            extra = extras.pop("extra_files", [])
            for f in extra:  # e.g. TensorRT's timing cache: kept in the bundle, not hashed as the artifact
                tx.stage(f if prefix == "." else f"{prefix}/{f}")
            entry = {"backend": runtime, "precision": precision, "source": src["path"], "cache_key": key,
                     "max_batch": max_batch, **extras}
            built.append(tx.add_artifact(entry, rels))
    return built


def stage_fp16_onnx(tx, stages=None) -> dict:
    """model.onnx -> model.fp16.onnx (LayerNorm in FP32), for strongly typed TensorRT FP16."""
    from . import onnx_io
    from .fp16 import convert_to_fp16
    src = tx.bundle.find("onnx", "fp32")
    path = tx.stage("model.fp16.onnx")
    run = stages.run if stages else (lambda _n, f, *a, **k: f(*a, **k))
    run("fp16 onnx", lambda: onnx_io.save(convert_to_fp16(onnx_io.load(tx.bundle.verify(src))), path))
    entry = {"backend": "onnx", "precision": "fp16", "source": src["path"], "source_sha256": src["sha256"],
             "conversion": "float16 everywhere but LayerNormalization (FP32, with Casts); FP32 input and output"}
    return tx.add_artifact(entry, onnx_io.files_of(path))


def compile_bundle(bundle_dir, target: str = "all", precision=None, device: str = "CPU", force: bool = False,
                   opt_batch: int = 1, workspace_mb: int = 2048, dla_core: int | None = None, quiet: bool = False) -> dict:
    """`vit-deploy compile`: build runtime artifacts for a bundle that already holds its ONNX files."""
    from .stages import Stages
    from .targets import plan_targets, wants_all

    Bundle.open(bundle_dir)  # a clear error when it is not a bundle
    runtimes, precisions = plan_targets(target, precision)
    runtimes, skipped = require_runtimes(runtimes, skip_missing=wants_all(target))
    with Bundle.writing(bundle_dir) as tx:
        stage_compile(tx, runtimes, precisions, max_batch=tx.manifest.get("max_batch", 32), device=device,
                      force=force, stages=Stages(quiet), opt_batch=opt_batch, workspace_mb=workspace_mb,
                      dla_core=dla_core, strict=precision is not None)
        if skipped:
            tx.manifest["skipped_targets"] = skipped
        tx.commit()
        return tx.manifest


# An ONNX file outside a bundle: each runtime's artifact goes beside it, NAME + suffix.
FILE_SUFFIXES = {"onnxruntime": ".ort.onnx", "openvino": ".xml", "tensorrt": ".engine"}


def compile_file(onnx_path, target: str = "onnxruntime,openvino", device: str = "CPU", max_batch: int = 32,
                 opt_batch: int = 1, workspace_mb: int = 2048, dla_core: int | None = None) -> list[Path]:
    """`vit-deploy compile FILE.onnx`: a file from another tool, or `quantize`'s INT8 output ->
    the artifact each runtime runs fastest, beside it (model.int8.onnx -> model.int8.ort.onnx,
    model.int8.xml/.bin, model.int8.engine), built as for a bundle: ONNX Runtime's INT8 kernels
    for every quantized product, OpenVINO's INT8 form. The precision is the file's (INT8 when it
    holds QuantizeLinear nodes). Each artifact is written under a temporary name and renamed
    into place. Returns the paths written, artifact first."""
    import os
    import shutil
    import tempfile

    from . import onnx_io
    from .targets import plan_targets, wants_all
    path = Path(onnx_path)
    if not path.is_file():
        raise UserError(f"model not found: {path}")
    try:
        model = onnx_io.load(path, with_weights=False)
    except Exception as e:
        raise UserError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    precision = "int8" if any(n.op_type == "QuantizeLinear" for n in model.graph.node) else "fp32"
    if not model.graph.input or len(model.graph.input[0].type.tensor_type.shape.dim) != 4:
        raise UserError(f"{path.name}: the input is not an image batch [batch, 3, H, W]")
    side = model.graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    runtimes, _ = plan_targets(target, None)
    runtimes, skipped = require_runtimes(runtimes, skip_missing=wants_all(target))
    if not runtimes:
        raise UserError(f"--target {target}: names no runtime to build for (onnxruntime, openvino, tensorrt)")
    for s in skipped:
        log.warning("[compile] %s skipped: %s", s["runtime"], s["reason"])
    if "tensorrt" in runtimes and not side:  # its optimization profile needs the image size
        raise UserError(f"{path.name}: the image size is dynamic; TensorRT needs a fixed one "
                        "(quantize fixes it, or export at one size)")
    stem = path.name[:-len(".onnx")] if path.name.endswith(".onnx") else path.name
    written = []
    for runtime in runtimes:
        out = path.with_name(stem + FILE_SUFFIXES[runtime])
        options = {"max_batch": max_batch, "device": device, "img_size": side or None, "opt_batch": opt_batch,
                   "workspace_mb": workspace_mb, "dla_core": dla_core, "threads": None}
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=path.parent))
        try:
            files, extras = backend(runtime).compile(path, tmp / out.name, precision, options)
            for name in [*reversed(files), *extras.get("extra_files", [])]:  # data first, the model last
                if (tmp / name).exists():
                    os.replace(tmp / name, path.with_name(name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        written += [path.with_name(f) for f in files]
    return written
