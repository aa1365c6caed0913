"""OpenVINO: IR (.xml + .bin) from the FP32 or Q/DQ ONNX model."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import Runner

RUNTIME = "openvino"
DEVICES = ("CPU", "GPU", "NPU", "AUTO")


def available() -> str | None:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "OpenVINO is not installed: pip install 'vit-deploy[openvino]' (or pip install openvino)"
    return None


def compile(onnx_path: Path, out: Path, precision: str, options: dict) -> tuple[list[str], dict]:
    import openvino as ov
    model = ov.convert_model(str(onnx_path))
    # Bound the dynamic batch: 1 .. max_batch, as exported.
    name = model.inputs[0].get_any_name()
    shape = model.inputs[0].get_partial_shape()
    shape[0] = ov.Dimension(1, int(options["max_batch"]))
    model.reshape({name: shape})
    _stable_names(model)
    # fp16: weights stored as FP16 (half the size). The Q/DQ model keeps its INT8 weights.
    ov.save_model(model, str(out), compress_to_fp16=precision == "fp16")
    return [out.name, out.with_suffix(".bin").name], {
        "runtime_version": ov.get_version(), "device": options.get("device") or "CPU",
        "performance_hint": "LATENCY", "inference_precision_hint": "f32",
        "compress_to_fp16": precision == "fp16"}


def _stable_names(model) -> None:
    """OpenVINO names the nodes it creates from a process-wide counter (Constant_5888),
    so the same model built twice in one process differs in its XML. Renumber those
    by position so that equal inputs give byte-identical IR."""
    import re
    auto = re.compile(r"^[A-Za-z]+_\d+$")
    for i, op in enumerate(model.get_ordered_ops()):
        if op.get_type_name() not in ("Parameter", "Result") and auto.match(op.get_friendly_name()):
            op.set_friendly_name(f"{op.get_type_name()}_vd{i}")


class OvRunner(Runner):
    name = "openvino"

    def __init__(self, path: Path, max_batch: int, img_size: int, device: str, threads: int | None,
                 precision_hint: str = "f32"):
        import openvino as ov
        super().__init__(max_batch, img_size)
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if device in ("CPU", "AUTO"):
            # Measured on AVX-512-BF16 CPUs without AMX: the default bf16 for float
            # parts was slower than f32 in every run (see README); f32 also keeps FP32 exact.
            config["INFERENCE_PRECISION_HINT"] = precision_hint
            if threads:
                config["INFERENCE_NUM_THREADS"] = int(threads)
        core = ov.Core()
        self.compiled = core.compile_model(str(path), device, config)
        self.request = self.compiled.create_infer_request()

    def infer(self, images: np.ndarray) -> np.ndarray:
        result = self.request.infer({0: images})
        return np.array(result[self.compiled.outputs[0]], dtype=np.float32, copy=True)


def open(path: Path, artifact: dict, options: dict) -> Runner:
    device = options.get("device") or artifact.get("device") or "CPU"
    r = OvRunner(path, options["max_batch"], options["img_size"], device, options.get("threads"),
                 artifact.get("inference_precision_hint", "f32"))
    r.name = f"openvino-{artifact['precision']}"
    return r
