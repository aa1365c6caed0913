"""Stage: a built torch model -> a verified, simplified ONNX file with a dynamic batch."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import onnx_io
from .errors import CheckFailed, UserError

log = logging.getLogger("vit_deploy")

OPSET_RANGE = (14, 20)
INPUT, OUTPUT, EMBEDDING = "images", "logits", "embedding"
TRACE_BATCH = 2
MAX_DYNAMO_BATCH = 4096  # torch.export needs a bound it may assume; far above any max_batch
VERIFY_BATCHES = (1, 4)  # both differ from the trace batch: a batch baked into a Reshape cannot pass
# MatMul + Add stays as it is: Reshape-Gemm-Reshape on 3-D activations hides the
# pattern that ONNX Runtime fuses into INT8 kernels (MatMulIntegerToFloat).
KEEP_MATMUL = ["fuse_matmul_add_bias_into_gemm", "fuse_matmul_add_bias_into_gemm_batched"]


def check_opset(opset: int) -> None:
    lo, hi = OPSET_RANGE
    if not lo <= opset <= hi:
        raise UserError(f"opset {opset} is not supported: choose {lo} to {hi} (17 gives one LayerNormalization op; "
                        f"use 14-16 only for runtimes that cannot parse it, such as TensorRT 8.6 on old JetPacks)")


@dataclass
class Traced:
    files: list[str]  # the files written
    warnings: list[str] = field(default_factory=list)  # where the tracer froze a Python value taken from a tensor
    exporter: str = "torchscript"  # or "dynamo": torch's dynamo exporter, where the tracer could not run the model
    opset: int = 17


DYNAMO_MIN_OPSET = 18  # the dynamo exporter writes opset 18+ (lower ones go through a version converter)


def export_onnx(model, path: Path, opset: int = 17, metadata: dict | None = None) -> Traced:
    """torch -> ONNX at `path`. Weight standardization is folded first. The output is
    named after what the model gives (`logits` or `embedding`). A model whose forward fails
    under the TorchScript tracer is exported by torch's dynamo exporter instead."""
    import torch

    from .models.resnetv2 import fold_weight_standardization

    check_opset(opset)
    name = (metadata or {}).get("model") or type(model).__name__
    folded = fold_weight_standardization(model)
    if folded:
        log.info("folded weight standardization into %d convs", folded)
    size = model.img_size
    output = output_name(model)
    dummy = torch.randn(TRACE_BATCH, 3, size, size)
    tmp_dir = path.parent / (path.name + ".parts")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    raw = tmp_dir / "model.onnx"
    exporter = "torchscript"
    try:  # the parts directory goes, whatever happens
        # The TorchScript exporter: no extra dependency, deterministic output, and
        # opset >= 17 gives LayerNormalization. It writes one file per tensor past 2 GB.
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # kept, not shown: they explain a failed verification
            try:
                with _stdout_discarded():  # on failure it prints the whole TorchScript graph, from C++
                    torch.onnx.export(model, (dummy,), str(raw), dynamo=False, opset_version=opset,
                                      input_names=[INPUT], output_names=[output],
                                      dynamic_axes={INPUT: {0: "batch"}, output: {0: "batch"}},
                                      do_constant_folding=True)
            except MemoryError:
                raise
            except Exception as e:
                # an op with no TorchScript ONNX form (transformers' DINOv2 with registers: an
                # antialiased bicubic resize), or the model's own forward failing under the tracer
                # (timm's EVA-02: is_causal as a tensor): torch's dynamo exporter may do it
                if isinstance(e, torch.onnx.errors.OnnxExporterError):
                    failure = f"{name} cannot be exported to ONNX (opset {opset}): " + \
                        (str(e).strip().splitlines() or [type(e).__name__])[0][:240]
                else:
                    failure = f"{name} cannot be traced for ONNX export: {_failure_line(e)}"
                opset = max(opset, DYNAMO_MIN_OPSET)
                _dynamo_export(model, dummy, raw, opset, output, failure)
                exporter = "dynamo"
                caught.clear()  # the tracer's warnings are about the failed trace
                log.warning("%s; exported with torch's dynamo exporter at opset %d instead", failure, opset)
        proto = onnx_io.load(raw)
        proto.producer_name = "vit-deploy"
        onnx_io.set_metadata(proto, metadata or {})
        files = onnx_io.save(proto, path)
        del proto
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return Traced(files, _frozen_values(caught), exporter, opset)


def _dynamo_export(model, dummy, raw: Path, opset: int, output: str, failure: str) -> None:
    """torch.onnx.export's dynamo exporter (torch.export, then onnxscript), with a dynamic batch."""
    import importlib.util

    import torch
    if importlib.util.find_spec("onnxscript") is None:
        raise UserError(f"{failure}; `pip install onnxscript` lets vit-deploy try torch's dynamo exporter")
    quiet = logging.getLogger("onnxscript")  # its optimizer warns about each Split it does not fold
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
            torch.onnx.export(model, (dummy,), str(raw), dynamo=True, opset_version=opset,
                              input_names=[INPUT], output_names=[output],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=MAX_DYNAMO_BATCH)},))
    except MemoryError:
        raise
    except Exception as e:
        while (e.__cause__ or e.__context__) is not None:  # torch.onnx wraps the error that says why
            e = e.__cause__ or e.__context__
        raise UserError(f"{failure}; torch's dynamo exporter failed too: {_failure_line(e)}") from None
    finally:
        quiet.setLevel(level)


@contextlib.contextmanager
def _stdout_discarded():
    """Standard output, Python's and the C++ libraries' (file descriptor 1), to nowhere meanwhile."""
    if sys.stdout is not None:
        sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 (a daemon): only Python's output to silence
        with contextlib.redirect_stdout(io.StringIO()):
            yield
        return
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(io.StringIO()):
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _failure_line(e: BaseException) -> str:
    """The exception, and the last frame outside torch where it was raised: the model's code."""
    import traceback
    frames = traceback.extract_tb(e.__traceback__)
    where = next((f for f in reversed(frames) if "/torch/" not in f.filename.replace("\\", "/")), None)
    first = re.sub(r"\x1b\[[0-9;]*m", "", (str(e).strip().splitlines() or [""])[0])[:200]  # no terminal colours
    at = f" (at {Path(where.filename).parent.name}/{Path(where.filename).name}:{where.lineno})" if where else ""
    return f"{type(e).__name__}: {first}{at}"


def output_name(model) -> str:
    return EMBEDDING if getattr(model, "output", "logits") == "embedding" else OUTPUT


def _frozen_values(caught) -> list[str]:
    """The tracer's warnings about tensor values turned into Python constants: the places
    where a model's control flow depends on its data, which a traced graph cannot keep."""
    import linecache

    import torch
    out = []
    for w in caught:
        if not issubclass(w.category, torch.jit.TracerWarning):
            continue
        what = str(w.message).split(" might ")[0].split(". ")[0]
        code = linecache.getline(w.filename, w.lineno).strip()
        out.append(f"{what} at {Path(w.filename).name}:{w.lineno} `{code}`")
    return list(dict.fromkeys(out))


def ort_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    from .backends.onnxruntime_backend import session_options
    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


def random_images(batch: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def simplify_onnx(path: Path) -> tuple[bool, str]:
    """onnxsim in place, accepted only if it gives the unsimplified model's outputs."""
    import onnxsim

    large = (path.parent / (path.name + ".data")).exists()
    candidate = path.with_name(path.name + ".simplified.onnx")
    try:
        if large:
            # onnxsim serializes the model it works on, which protobuf caps at 2 GB.
            # It gets the graph with the external weights as stub inputs instead;
            # they go back as references into the same data file, never copied.
            light = onnx_io.load(path, with_weights=False)
            simplified = _simplify_weights_as_inputs(light)
            import onnx
            onnx.save_model(simplified, str(candidate))
            files = [candidate.name]
        else:
            simplified, ok = onnxsim.simplify(onnx_io.load(path), skipped_optimizers=KEEP_MATMUL)
            if not ok:
                return False, "onnxsim's own check failed"
            files = onnx_io.save(simplified, candidate, external=False)
        del simplified
    except Exception as e:  # onnxsim raises many kinds; the export stays usable without it
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        return False, f"onnxsim failed: {type(e).__name__}: {msg}"
    try:
        size = _input_size(path)
        for batch in (1, 3):
            x = random_images(batch, size, seed=batch)
            a = ort_session(path).run(None, {INPUT: x})[0]
            b = ort_session(candidate).run(None, {INPUT: x})[0]
            diff = float(np.abs(a - b).max())
            if diff > 1e-5 * max(1.0, float(np.abs(a).max())):
                return False, f"simplified model differs from the original by {diff:.2e} at batch {batch}"
        import os
        os.replace(candidate, path)  # the data file (large case) is shared and unchanged
        return True, "simplified with onnxsim and checked against the unsimplified model"
    finally:
        for f in files:
            (path.parent / f).unlink(missing_ok=True)


def _simplify_weights_as_inputs(light):
    """Simplify a model loaded without its external data."""
    import onnx
    import onnxsim

    external = {t.name: t for t in light.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    graph = light.graph
    stubs = [onnx.helper.make_tensor_value_info(n, t.data_type, list(t.dims)) for n, t in external.items()]
    kept = [t for t in graph.initializer if t.name not in external]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.input.extend(stubs)
    simplified, _ = onnxsim.simplify(light, check_n=0, skipped_optimizers=KEEP_MATMUL)
    used = {i for n in simplified.graph.node for i in n.input} | {o.name for o in simplified.graph.output}
    sg = simplified.graph
    inputs = [i for i in sg.input if i.name not in external]
    del sg.input[:]
    sg.input.extend(inputs)
    sg.initializer.extend(t for n, t in external.items() if n in used)
    return simplified


def _input_size(path: Path) -> int:
    model = onnx_io.load(path, with_weights=False)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return int(dims[2].dim_value)


def verify_onnx(path: Path, model, tol: float = 1e-4, trace_warnings=(), model_name: str | None = None) -> dict:
    """ONNX Runtime vs PyTorch at two batch sizes; raises CheckFailed past `tol` (relative to the
    output scale), or UserError naming the data-dependent control flow the tracer froze, if any."""
    import torch
    sess = ort_session(path)
    result = {}
    for batch in VERIFY_BATCHES:
        x = random_images(batch, model.img_size, seed=100 + batch)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        got = sess.run(None, {INPUT: x})[0]
        problem = None
        if got.shape != ref.shape:
            problem = f"ONNX Runtime output shape {got.shape} at batch {batch}, PyTorch {ref.shape}"
        else:
            diff = float(np.abs(got - ref).max())
            result[f"batch{batch}_max_abs_diff"] = diff
            if diff > tol * max(1.0, float(np.abs(ref).max())):
                problem = f"ONNX Runtime differs from PyTorch by {diff:.2e} at batch {batch}"
        if problem and trace_warnings:
            raise UserError(f"{model_name or type(model).__name__}: export needs data-dependent control flow, which an "
                            f"ONNX graph cannot hold: {trace_warnings[0]}"
                            + (f" (and {len(trace_warnings) - 1} more)" if len(trace_warnings) > 1 else "")
                            + f"; {problem}")
        if problem:
            raise CheckFailed(f"{path.name}: {problem}")
    result["tolerance"] = tol
    return result
