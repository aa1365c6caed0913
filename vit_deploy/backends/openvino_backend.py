"""OpenVINO: IR (.xml + .bin) from the FP32 or Q/DQ ONNX model."""
from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from ..cpu import is_arm
from ..errors import UserError
from . import Runner

RUNTIME = "openvino"
FORMS = {"int8": "uint8-activations-on-weight-products,k-transpose-next-to-matmul"}  # see openvino_int8; in compile's cache key
DEVICES = ("CPU", "GPU", "NPU", "AUTO")

# Inference precision on CPUs, per artifact. OpenVINO's own default computes float parts
# in f16 on ARM (5e-2 max abs on a 12-layer MatMul chain under emulation) and in bf16 on
# x86 CPUs with AVX512_BF16 or AMX, so FP32 and INT8 artifacts pin f32 on every CPU. The
# FP16 artifact asks for half precision, resolved on the CPU that runs it (HALF below).
PINNED_F32 = "f32"
HALF = "half"


def precision_policy(precision: str) -> str:
    return HALF if precision == "fp16" else PINNED_F32


def half_precision_for(capabilities, machine: str) -> str:
    """The half type a CPU computes natively (OpenVINO's OPTIMIZATION_CAPABILITIES): f16 on
    ARM cores with FP16 arithmetic, bf16 on x86 with AVX512_BF16 or AMX; else f32."""
    caps = set(capabilities)
    arm = machine.lower() in ("aarch64", "arm64") or machine.lower().startswith("arm")
    order = (("FP16", "f16"), ("BF16", "bf16")) if arm else (("BF16", "bf16"), ("FP16", "f16"))
    return next((hint for cap, hint in order if cap in caps), "f32")


def cpu_capabilities(core=None) -> list[str]:
    import openvino as ov
    return list((core or ov.Core()).get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def resolve_precision(policy: str, core=None) -> str:
    """The INFERENCE_PRECISION_HINT for a CPU: the policy itself, or for HALF what this CPU has."""
    if policy != HALF:
        return policy
    return half_precision_for(cpu_capabilities(core), platform.machine())


def available() -> str | None:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "OpenVINO is not installed: pip install 'vit-deploy[openvino]' (or pip install openvino)"
    return None


def compile(onnx_path: Path, out: Path, precision: str, options: dict) -> tuple[list[str], dict]:
    import tempfile

    import openvino as ov
    extras = {}
    with tempfile.TemporaryDirectory(prefix="vit-deploy-ov-") as tmp:
        src = onnx_path
        if precision == "int8":  # the portable Q/DQ file in the form OpenVINO's INT8 kernels run fastest
            from .. import onnx_io
            from .openvino_int8 import for_openvino
            model = onnx_io.load_lazy(onnx_path)  # weights stay on disk (vit-h14)
            extras["int8_rewrite"] = for_openvino(model)
            src = Path(tmp) / onnx_path.name
            onnx_io.save(model, src, external=onnx_io.has_external(model))
            del model
            # read_model, not convert_model: the latter folds each uint8 Q/DQ pair back into a
            # signed FakeQuantize, and the products run with int8 activations again.
            model = _read(lambda: ov.Core().read_model(str(src)), onnx_path)
        else:
            model = _read(lambda: ov.convert_model(str(src)), onnx_path)
    # Bound the dynamic batch: 1 .. max_batch, as exported.
    name = model.inputs[0].get_any_name()
    shape = model.inputs[0].get_partial_shape()
    if shape[0].is_dynamic:  # a graph exported with a fixed batch keeps it
        shape[0] = ov.Dimension(1, int(options["max_batch"]))
        model.reshape({name: shape})
    _stable_names(model)
    # fp16: weights stored as FP16 (half the size). The Q/DQ model keeps its INT8 weights.
    ov.save_model(model, str(out), compress_to_fp16=precision == "fp16")
    policy = precision_policy(precision)
    return [out.name, out.with_suffix(".bin").name], {
        **extras, "runtime_version": ov.get_version(), "device": options.get("device") or "CPU",
        "performance_hint": "LATENCY", "inference_precision_hint": policy,
        # what the building machine's CPU resolves it to; each machine resolves it again
        "inference_precision_on_build_cpu": resolve_precision(policy),
        "compress_to_fp16": precision == "fp16"}


def _read(convert, onnx_path: Path):
    """OpenVINO's reading of an ONNX file; a graph its frontend cannot convert (some foreign
    exports) is the file's limit on this runtime: one line naming the file and the ops."""
    import openvino as ov
    try:
        return convert()
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        failed = next((ln for ln in lines if ln.startswith("-- Conversion is failed for")), None) or \
            next((ln for ln in lines if "failed" in ln.lower()), lines[-1] if lines else type(e).__name__)
        raise UserError(f"{onnx_path.name}: OpenVINO {ov.get_version()} cannot read this graph "
                        f"({failed.lstrip('- ')[:300]})") from None


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
    """`static_shapes` (default: on ARM CPUs) compiles one static-shape model per batch size
    met, on first use: OpenVINO 2026.4's ARM CPU plugin computes INT8 MatMuls of a model
    with a dynamic batch wrongly (cosine 0.90 on vit-ti16 under emulated Cortex-A72,
    Neoverse N1 and SVE CPUs alike) and the same model reshaped to a static batch exactly.

    `without_vnni` gives an INT8 model the form x86 CPUs without VNNI or AMX run best and
    exactly: attention products in float, int8 activations (open() asks for it on such a
    CPU; openvino_int8.for_cpus_without_vnni says why)."""
    name = "openvino"

    def __init__(self, path: Path, max_batch: int, img_size: int, device: str, threads: int | None,
                 precision_policy: str = PINNED_F32, static_shapes: bool | None = None,
                 without_vnni: bool = False):
        import openvino as ov
        super().__init__(max_batch, img_size)
        self.config = {"PERFORMANCE_HINT": "LATENCY"}
        self.core, self.device = ov.Core(), device
        self.inference_precision = None  # the device's own choice (GPU, NPU)
        if device in ("CPU", "AUTO"):
            self.inference_precision = resolve_precision(precision_policy, self.core)
            self.config["INFERENCE_PRECISION_HINT"] = self.inference_precision
            if threads:
                self.config["INFERENCE_NUM_THREADS"] = int(threads)
        self.static_shapes = is_arm() if static_shapes is None else static_shapes
        self.by_batch: dict[int, tuple] = {}
        self.load_rewrites: dict[str, int] = {}
        if self.static_shapes or without_vnni:
            self.model = self.core.read_model(str(path))
            if without_vnni:
                from .openvino_int8 import for_cpus_without_vnni
                self.load_rewrites = for_cpus_without_vnni(self.model)
        if self.static_shapes:
            self.compiled, _ = self._compiled_for(1)
        else:
            self.compiled = self.core.compile_model(self.model if without_vnni else str(path), device, self.config)
            self.request = self.compiled.create_infer_request()
            self.model = None  # compiled: the graph's own copy of the weights can go (vit-h14)

    def _compiled_for(self, batch: int):
        if batch not in self.by_batch:
            model = self.model.clone()
            shape = model.inputs[0].get_partial_shape()
            shape[0] = batch
            model.reshape({model.inputs[0].get_any_name(): shape})
            compiled = self.core.compile_model(model, self.device, self.config)
            self.by_batch[batch] = (compiled, compiled.create_infer_request())
        return self.by_batch[batch]

    def infer(self, images: np.ndarray) -> np.ndarray:
        compiled, request = self._compiled_for(len(images)) if self.static_shapes else (self.compiled, self.request)
        result = request.infer({0: images})
        return np.array(result[compiled.outputs[0]], dtype=np.float32, copy=True)

    def close(self) -> None:
        self.compiled = self.request = self.model = None
        self.by_batch.clear()


def open(path: Path, artifact: dict, options: dict) -> Runner:
    device = options.get("device") or artifact.get("device") or "CPU"
    # Bundles made before HALF existed recorded f32 for FP16 too: they keep it until rebuilt.
    r = OvRunner(path, options["max_batch"], options["img_size"], device, options.get("threads"),
                 artifact.get("inference_precision_hint", PINNED_F32),
                 without_vnni=artifact["precision"] == "int8" and without_vnni_here(device))
    r.name = f"openvino-{artifact['precision']}"
    return r


def without_vnni_here(device: str = "CPU") -> bool:
    """Whether INT8 artifacts get the no-VNNI form on this machine (OvRunner's without_vnni)."""
    from ..cpu import int8_sums_saturate
    return device in ("CPU", "AUTO") and int8_sums_saturate()


def describe_precision(artifacts: list[dict]) -> str | None:
    """One line for `info`: the inference precision of each OpenVINO artifact on this CPU."""
    arts = [a for a in artifacts if a["backend"] == RUNTIME]
    if not arts:
        return None
    try:
        caps = cpu_capabilities()
    except Exception as e:  # info reports, it does not fail: OpenVINO missing or broken here
        caps, why = None, f"OpenVINO not usable here ({type(e).__name__})"
    parts = []
    for a in arts:
        policy = a.get("inference_precision_hint", PINNED_F32)
        if policy == HALF:
            here = half_precision_for(caps, platform.machine()) if caps is not None else why
            built = a.get("inference_precision_on_build_cpu")
            parts.append(f"{a['precision']} half where the CPU computes it: {here} on this CPU"
                         + (f", {built} where it was built" if built else ""))
        else:
            parts.append(f"{a['precision']} {policy} (pinned on every CPU)" + (
                ", on this CPU (x86 without VNNI) with its attention products in float and int8 activations"
                if a["precision"] == "int8" and without_vnni_here() else ""))
    return "; ".join(parts) + (f"  [CPU capabilities: {', '.join(caps)}]" if caps is not None else "")
