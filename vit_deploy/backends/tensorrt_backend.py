"""TensorRT: a serialized engine built with the TensorRT Python API, run with
its own CUDA buffers (cuda-python).

Written from NVIDIA's documented API (Python API reference, samples/python,
the 10.x -> 11.x migration guide). Kept thin: the decisions live in
`plan_build`, plain data that tests check on machines without TensorRT.

- Every network is strongly typed: the precision of each tensor comes from the
  ONNX. INT8 from the Q/DQ model (implicit INT8 calibration was deprecated in
  10.1 and removed in 11); FP16 from model.fp16.onnx, where LayerNormalization
  stays FP32 (it overflows in FP16 on trained ViTs). Weak typing and its
  FP16/INT8 builder flags were deprecated in 10.12 and are gone in 11.x, so one
  path serves 10.x (JetPack 6 ships 10.3) and 11.x alike.
"""
from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np

from ..errors import UserError
from . import Runner

RUNTIME = "tensorrt"
INSTALL = ("TensorRT is not installed: it comes with JetPack on a Jetson, or from NVIDIA's packages "
           "(pip install tensorrt with NVIDIA's CUDA libraries) on a desktop GPU")


def available() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except Exception:  # the PyPI stub raises at import when NVIDIA's libraries are absent
        return INSTALL
    return None


def major_version(version: str) -> int:
    return int(str(version).split(".")[0])


def plan_build(version: str, precision: str, *, img_size: int, max_batch: int, opt_batch: int = 1,
               workspace_mb: int = 2048, dla_core: int | None = None, timing_cache: str = "trt.timing-cache",
               onnx_file: str = "model.onnx", engine_file: str = "model.engine", input_name: str = "images") -> dict:
    """Everything the builder will be told, as data: the test surface of this module."""
    major = major_version(version)
    if major < 10:
        raise UserError(f"TensorRT {version} is too old: vit-deploy needs 10.x or 11.x (JetPack 6 ships 10.3)")
    if precision not in ("fp32", "fp16", "int8"):
        raise UserError(f"TensorRT precision must be fp32, fp16 or int8, not {precision}")
    if not 1 <= opt_batch <= max_batch:
        raise UserError(f"--opt-batch {opt_batch} must lie in 1..{max_batch} (the max batch)")
    shape = lambda b: (b, 3, img_size, img_size)  # noqa: E731
    plan = {
        "trt_version": version,
        "precision": precision,
        "strongly_typed": True,  # types come from the ONNX (FP16 / Q/DQ files); the flag is implicit in 11.x
        "profile": {"input": input_name, "min": shape(1), "opt": shape(opt_batch), "max": shape(max_batch)},
        "workspace_bytes": int(workspace_mb) << 20,
        "dla_core": dla_core,
        "timing_cache": timing_cache,
    }
    plan["trtexec"] = trtexec_command(plan, onnx_file, engine_file)
    return plan


def trtexec_command(plan: dict, onnx_file: str, engine_file: str) -> str:
    """The equivalent trtexec line, to rebuild the engine by hand on the device."""
    p = plan["profile"]
    fmt = lambda s: "x".join(map(str, s))  # noqa: E731
    args = ["trtexec", f"--onnx={onnx_file}", f"--saveEngine={engine_file}",
            f"--minShapes={p['input']}:{fmt(p['min'])}", f"--optShapes={p['input']}:{fmt(p['opt'])}",
            f"--maxShapes={p['input']}:{fmt(p['max'])}",
            f"--memPoolSize=workspace:{plan['workspace_bytes'] >> 20}M",
            f"--timingCacheFile={plan['timing_cache']}"]
    if plan["strongly_typed"] and major_version(plan["trt_version"]) < 11:
        args.append("--stronglyTyped")
    if plan["dla_core"] is not None:
        args += [f"--useDLACore={plan['dla_core']}", "--allowGPUFallback"]
    return shlex.join(args)


def build_engine(trt, onnx_path: Path, plan: dict, cache_path: Path) -> bytes:
    """Parse the ONNX and build a serialized engine following `plan`."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if plan["strongly_typed"]:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan["workspace_bytes"])
    p = plan["profile"]
    profile = builder.create_optimization_profile()
    profile.set_shape(p["input"], p["min"], p["opt"], p["max"])
    config.add_optimization_profile(profile)
    if plan["dla_core"] is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(plan["dla_core"])
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise UserError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log above)")
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(engine)


def gpu_name() -> str | None:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            return None
    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        return None
    name = props.name
    return (name.decode() if isinstance(name, bytes) else str(name)).strip("\x00 ") + f" (sm_{props.major}{props.minor})"


def compile(onnx_path: Path, out: Path, precision: str, options: dict) -> tuple[list[str], dict]:
    import tensorrt as trt

    from .. import onnx_io
    plan = plan_build(trt.__version__, precision, img_size=options["img_size"], max_batch=options["max_batch"],
                      opt_batch=options.get("opt_batch") or 1, workspace_mb=options.get("workspace_mb") or 2048,
                      dla_core=options.get("dla_core"), onnx_file=onnx_path.name, engine_file=out.name,
                      input_name=onnx_io.load(onnx_path, with_weights=False).graph.input[0].name)
    cache_rel = plan["timing_cache"]
    cache_path = out.parent / cache_rel
    existing = options.get("bundle_dir")
    if existing and (Path(existing) / cache_rel).is_file() and not cache_path.exists():
        cache_path.write_bytes((Path(existing) / cache_rel).read_bytes())  # keep the bundle's cache warm
    out.write_bytes(build_engine(trt, onnx_path, plan, cache_path))
    return [out.name], {"runtime_version": trt.__version__, "device": gpu_name(), "build_plan": plan,
                        "trtexec": plan["trtexec"], "extra_files": [cache_rel]}


class TrtRunner(Runner):
    """Executes an engine with device buffers sized for the max batch."""

    name = "tensorrt"

    def __init__(self, path: Path, artifact: dict, max_batch: int, img_size: int):
        import tensorrt as trt
        super().__init__(max_batch, img_size)
        built_with = artifact.get("runtime_version")
        if built_with and built_with != trt.__version__:
            raise UserError(f"{path.name} was built with TensorRT {built_with}, this machine has "
                            f"{trt.__version__}: rebuild it here with `vit-deploy compile --target tensorrt`")
        here = gpu_name()
        if artifact.get("device") and here and artifact["device"] != here:
            raise UserError(f"{path.name} was built for {artifact['device']}, this GPU is {here}: "
                            f"rebuild it here with `vit-deploy compile --target tensorrt`")
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            try:
                from cuda import cudart
            except ImportError:
                raise UserError("running TensorRT engines needs cuda-python: pip install cuda-python") from None
        self.cudart, self.trt = cudart, trt
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise UserError(f"{path.name}: TensorRT cannot deserialize this engine (other version or device?)")
        self.context = self.engine.create_execution_context()
        self.input = next(self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)
                          if self.engine.get_tensor_mode(self.engine.get_tensor_name(i)) == trt.TensorIOMode.INPUT)
        self.output = next(self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)
                           if self.engine.get_tensor_name(i) != self.input)
        self.stream = self._call(cudart.cudaStreamCreate())
        self.num_classes = int(self.engine.get_tensor_shape(self.output)[-1])
        self.d_in = self._call(cudart.cudaMalloc(max_batch * 3 * img_size * img_size * 4))
        self.d_out = self._call(cudart.cudaMalloc(max_batch * self.num_classes * 4))
        self.context.set_tensor_address(self.input, int(self.d_in))
        self.context.set_tensor_address(self.output, int(self.d_out))

    @staticmethod
    def _call(result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise RuntimeError(f"CUDA error {err}")
        return rest[0] if len(rest) == 1 else rest

    def infer(self, images: np.ndarray) -> np.ndarray:
        cudart = self.cudart
        b = images.shape[0]
        out = np.empty((b, self.num_classes), np.float32)
        self.context.set_input_shape(self.input, images.shape)
        self._call(cudart.cudaMemcpyAsync(self.d_in, images.ctypes.data, images.nbytes,
                                          cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
        if not self.context.execute_async_v3(stream_handle=int(self.stream)):
            raise RuntimeError("TensorRT execution failed")
        self._call(cudart.cudaMemcpyAsync(out.ctypes.data, self.d_out, out.nbytes,
                                          cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        self._call(cudart.cudaStreamSynchronize(self.stream))
        return out

    def close(self) -> None:
        for ptr in (getattr(self, "d_in", None), getattr(self, "d_out", None)):
            if ptr is not None:
                self.cudart.cudaFree(ptr)
        if getattr(self, "stream", None) is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None
        self.d_in = self.d_out = None


def open(path: Path, artifact: dict, options: dict) -> Runner:
    r = TrtRunner(path, artifact, options["max_batch"], options["img_size"])
    r.name = f"tensorrt-{artifact['precision']}"
    return r
