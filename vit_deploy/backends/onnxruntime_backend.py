"""ONNX Runtime: the graph-optimized model saved offline, run on the CPU provider."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import Runner

RUNTIME = "onnxruntime"
# The int8 rewrite (ort_int8.for_onnxruntime), in compile's cache key: a new one rebuilds old artifacts
FORMS = {"int8": "uint8-activations,float-attention-without-operand-clips,rank2-kernels"}


def available() -> str | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "ONNX Runtime is not installed: pip install onnxruntime"
    return None


def session_options(threads: int | None = None):
    """The options of every ONNX Runtime session vit-deploy opens."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or 0
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # No busy-waiting between calls: spinning threads steal the cores from whatever
    # runs next (another runtime in an interleaved bench, the rest of the app).
    # Measured on vit-b16 INT8, interleaved with OpenVINO: 100 ms spinning, 64 ms not.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def compile(onnx_path: Path, out: Path, precision: str, options: dict) -> tuple[list[str], dict]:
    """Apply ORT's offline graph optimizations and save the result.

    EXTENDED (not ALL): ALL adds layout transforms tied to this CPU's
    instruction set, which ORT documents as unsafe to save for other machines."""
    import tempfile

    import onnxruntime as ort
    so = session_options(options.get("threads"))
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(out)
    large = (onnx_path.parent / (onnx_path.name + ".data")).exists()
    if large:
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", out.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    extras = {"graph_optimization_level": "ORT_ENABLE_EXTENDED", "runtime_version": ort.__version__}
    with tempfile.TemporaryDirectory(prefix="vit-deploy-ort-") as tmp:
        src = onnx_path
        if precision == "int8" or not large:
            from .. import onnx_io
            from ..size_folding import fold_size_constants
            from .ort_int8 import for_onnxruntime
            model = onnx_io.load(onnx_path)
            changed = False
            if precision == "int8":  # the portable Q/DQ file in the form ORT's INT8 kernels take (see ort_int8)
                extras["int8_rewrite"] = for_onnxruntime(model)
                changed = True
            # ORT folds no Shape of a dynamic-batch graph: what only the image size fixes, fixed here
            extras["size_folded"] = fold_size_constants(model, options.get("img_size"))
            if changed or extras["size_folded"]:
                src = Path(tmp) / onnx_path.name
                onnx_io.save(model, src, external=large)
            del model
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    files = [out.name] + ([out.name + ".data"] if large else [])
    return files, extras


class OrtRunner(Runner):
    name = "onnxruntime"

    def __init__(self, path: Path, max_batch: int, img_size: int, threads: int | None):
        import onnxruntime as ort
        super().__init__(max_batch, img_size)
        so = session_options(threads)
        # ALL at load time: the saved model already has the portable rewrites; the
        # layout transforms for this very CPU are applied here, where it is known.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def infer(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: images})[0]

    def close(self) -> None:
        self.session = None


def open(path: Path, artifact: dict, options: dict) -> Runner:
    r = OrtRunner(path, options["max_batch"], options["img_size"], options.get("threads"))
    r.name = f"{artifact['backend']}-{artifact['precision']}"
    return r
