"""A STAND-IN for the small part of TensorRT's Python API that vit-deploy calls.

It is not TensorRT and builds nothing real: it records what the builder was
told (flags, profile, layer precisions, timing cache) so the logic around the
API can be tested on machines without NVIDIA's libraries. Names and call
shapes follow NVIDIA's Python API reference (tensorrt.Builder,
IBuilderConfig, IOptimizationProfile, OnnxParser, ITimingCache).
"""
from __future__ import annotations

import enum
import types

import onnx


def make(version: str = "10.3.0"):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.float32 = "float32"
    trt.calls = []

    class Logger:
        WARNING = 2

        def __init__(self, severity=None):
            self.severity = severity

    class NetworkDefinitionCreationFlag(enum.IntEnum):
        EXPLICIT_BATCH = 0
        STRONGLY_TYPED = 5

    class BuilderFlag(enum.Enum):
        FP16 = "FP16"
        OBEY_PRECISION_CONSTRAINTS = "OBEY_PRECISION_CONSTRAINTS"
        GPU_FALLBACK = "GPU_FALLBACK"

    if int(version.split(".")[0]) >= 11:  # 11.x removed the weak-typing flags
        class BuilderFlag(enum.Enum):  # noqa: F811
            GPU_FALLBACK = "GPU_FALLBACK"

    class MemoryPoolType(enum.Enum):
        WORKSPACE = "WORKSPACE"

    class LayerType(enum.Enum):
        NORMALIZATION = "NORMALIZATION"
        MATRIX_MULTIPLY = "MATRIX_MULTIPLY"

    class DeviceType(enum.Enum):
        GPU = "GPU"
        DLA = "DLA"

    class TensorIOMode(enum.Enum):
        INPUT = "INPUT"
        OUTPUT = "OUTPUT"

    class Layer:
        def __init__(self, op):
            self.type = LayerType.NORMALIZATION if op == "LayerNormalization" else LayerType.MATRIX_MULTIPLY
            self.name, self.precision, self.num_outputs, self.output_types = op, None, 1, {}

        def set_output_type(self, i, t):
            self.output_types[i] = t

    class Network:
        def __init__(self, flags):
            self.flags, self.layers, self.inputs = flags, [], []

        @property
        def num_layers(self):
            return len(self.layers)

        def get_layer(self, i):
            return self.layers[i]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            model = onnx.load(path, load_external_data=False)
            self.network.layers = [Layer(n.op_type) for n in model.graph.node]
            self.network.inputs = [i.name for i in model.graph.input]
            trt.calls.append(("parse", path))
            return True

        def get_error(self, i):  # pragma: no cover
            return "no error"

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, mn, opt, mx):
            self.shapes[name] = (tuple(mn), tuple(opt), tuple(mx))

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data + b"+timed"

    class Config:
        def __init__(self):
            self.flags, self.pools, self.profiles = set(), {}, []
            self.default_device_type, self.DLA_core, self.cache = DeviceType.GPU, -1, None

        def set_flag(self, f):
            self.flags.add(f)

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size

        def add_optimization_profile(self, p):
            self.profiles.append(p)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            trt.last_build = {"network": network, "config": config}
            # as TensorRT does: a dynamic input without a profile shape fails the build (None)
            if any(i not in p.shapes for p in config.profiles for i in network.inputs):
                return None
            return b"STANDIN-ENGINE"

    for name, obj in list(locals().items()):
        if isinstance(obj, type):
            setattr(trt, name, obj)
    return trt
