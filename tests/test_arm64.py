"""ARM64 CPU kernels, under qemu user-mode emulation (issue 13).

The emulated test runs where benchmarks/arm64_check.py has built its sysroot (its
--workdir, default ~/.cache/vit-deploy/arm64) and qemu-aarch64-static is installed; it
skips itself, saying so, everywhere else (CI has neither). The x86 half runs everywhere.
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
M, K, N = 4, 64, 16
ACT_CLIP = 1.0   # the activation's calibrated range: inputs below -1 quantize to -128


def _arm64_check():
    spec = importlib.util.spec_from_file_location("arm64_check", REPO / "benchmarks" / "arm64_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _float_matmul() -> onnx.ModelProto:
    """x [M, K] @ W [K, N] with W all -1: every weight is at the negative end of its channel."""
    w = numpy_helper.from_array(-np.ones((K, N), np.float32), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="matmul")], "limits",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def vit_deploy_int8(levels: int) -> onnx.ModelProto:
    """The graph quantized by vit-deploy's own Q/DQ writer: weights capped at +-levels."""
    from vit_deploy.quantize import find_targets, insert_qdq
    model = _float_matmul()
    targets = find_targets(model)
    return insert_qdq(model, targets, {"x": [ACT_CLIP, -ACT_CLIP, ACT_CLIP]}, "symmetric",
                      {t.weight: levels for t in targets})


def minus_128_int8() -> onnx.ModelProto:
    """The same file with its int8 weights set to -128: -128 x -128 products, which no
    vit-deploy file has (a full-range quantizer writes -128 for the most negative weight)."""
    model = vit_deploy_int8(127)
    for t in model.graph.initializer:
        if t.data_type == TensorProto.INT8 and len(t.dims) == 2:
            t.CopyFrom(numpy_helper.from_array(np.full(tuple(t.dims), -128, np.int8), t.name))
    return model


def exact(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """Q/DQ arithmetic in float64: what an INT8 kernel that never saturates computes."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    w_q = next(v for k, v in inits.items() if v.dtype == np.int8 and v.ndim == 2).astype(np.float64)
    w_s = next(v for k, v in inits.items() if k.startswith("W") and k.endswith("_scale")).astype(np.float64)
    x_s = next(v for k, v in inits.items() if k.startswith("x") and k.endswith("_scale")).astype(np.float64)
    x_q = np.clip(np.round(x / x_s), -128, 127)
    return (x_q * x_s) @ (w_q * w_s)


# every activation quantizes to -128 (int8) on even rows and to 127 (uint8 255 in OpenVINO's form) on odd rows
LIMIT_INPUT = np.where(np.arange(M)[:, None] % 2 == 0, -4.0, 4.0).astype(np.float32) * np.ones((M, K), np.float32)

# Run inside the emulated Python: each file on ONNX Runtime (all graph optimizations, so Q/DQ
# MatMul becomes an INT8 kernel) and OpenVINO (f32 for the float parts, as vit-deploy pins).
GUEST = r"""
import json, sys, numpy as np, onnxruntime as ort, openvino as ov
x = np.load(sys.argv[1])
out = {}
core = ov.Core()
for path in sys.argv[2:]:
    so = ort.SessionOptions(); so.intra_op_num_threads = 1
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    out[path + "|onnxruntime"] = s.run(None, {"x": x})[0].tolist()
    c = core.compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1})
    out[path + "|openvino"] = c.create_infer_request().infer({0: x})[c.outputs[0]].tolist()
print(json.dumps(out))
"""


def test_vit_deploy_int8_weights_never_reach_minus_128():
    """x86, everywhere: the Q/DQ writer caps weights at +-127 (+-63 with the overflow fix), so
    a product of two int8 operands has at most one -128 (activations can saturate to -128)."""
    for levels in (127, 63):
        q = [numpy_helper.to_array(t) for t in vit_deploy_int8(levels).graph.initializer
             if t.data_type == TensorProto.INT8 and len(t.dims) == 2]
        assert len(q) == 1 and q[0].min() == -levels and q[0].max() <= levels


def test_bundle_int8_files_have_no_minus_128_weight(ti_bundle):
    """The INT8 ONNX and OpenVINO files of a real export: no int8 weight is -128."""
    m = onnx.load(str(ti_bundle / "model.int8.onnx"))
    weights = [numpy_helper.to_array(t) for t in m.graph.initializer if t.data_type == TensorProto.INT8 and t.dims]
    assert weights and min(int(w.min()) for w in weights) >= -127
    # OpenVINO's IR keeps the int8 constants as they were in the ONNX file
    import openvino as ov
    ir = ov.Core().read_model(str(ti_bundle / "openvino" / "model.int8.xml"))
    consts = [op.get_data() for op in ir.get_ordered_ops()
              if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8]
    assert consts and min(int(c.min()) for c in consts) >= -127


def _emulation():
    """(arm64_check module, workdir) when the sysroot and qemu are here, else skip with why."""
    if shutil.which("qemu-aarch64-static") is None:
        pytest.skip("needs qemu-user-static (apt-get install -y qemu-user-static mmdebstrap) and the sysroot "
                    "of benchmarks/arm64_check.py")
    mod = _arm64_check()
    workdir = Path(os.environ.get("VIT_DEPLOY_ARM64_WORKDIR", "")
                   or Path(os.environ.get("VIT_DEPLOY_CACHE", Path.home() / ".cache" / "vit-deploy")) / "arm64")
    sites = sorted(workdir.glob("site-py*/.vit-deploy-stamp"))
    if not (workdir / "sysroot" / ".vit-deploy-stamp").is_file() or not sites:
        pytest.skip(f"no aarch64 sysroot in {workdir}: run `python benchmarks/arm64_check.py BUNDLE` once "
                    "(or set VIT_DEPLOY_ARM64_WORKDIR)")
    return mod, workdir, sites[-1].parent


def _lock(lock, workdir):
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pytest.skip(f"the aarch64 sysroot in {workdir} is busy with an ARM64 check run")


def test_int8_limits_on_emulated_cortex_a72(tmp_path):
    """Cortex-A72 has no dot product: its INT8 kernels add int8 x int8 products in 16 bits,
    and -128 x -128 pairs overflow there (ONNX Runtime issue #31573). vit-deploy's files
    (weights within +-127 or +-63, and the uint8-activation form OpenVINO gets of the
    +-63 one) come out exact; the -128 x -128 file does not."""
    mod, workdir, site = _emulation()
    from vit_deploy.backends.openvino_int8 import for_openvino
    openvino_form = vit_deploy_int8(63)
    assert for_openvino(openvino_form)["uint8_activations"] == 1
    files = {"vit-deploy 8-bit weights": vit_deploy_int8(127), "vit-deploy 7-bit weights": vit_deploy_int8(63),
             "7-bit weights, OpenVINO's uint8 form": openvino_form, "-128 x -128": minus_128_int8()}
    paths = {}
    for i, (name, model) in enumerate(files.items()):
        paths[name] = tmp_path / f"m{i}.onnx"
        onnx.save(model, str(paths[name]))
    np.save(tmp_path / "x.npy", LIMIT_INPUT)
    root = workdir / "sysroot"
    with open(workdir / ".lock", "w") as lock:
        _lock(lock, workdir)   # one fake /proc/cpuinfo per sysroot
        python, _ = mod.guest_python(root)
        guest = mod.Guest(shutil.which("qemu-aarch64-static"), root, python, [site], "cortex-a72")
        mod.write_cpu_identity(root, mod.probe_cpu(guest))
        r = guest.run(["-c", GUEST, str(tmp_path / "x.npy"), *map(str, paths.values())], timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    errors = {}
    for name, path in paths.items():
        want = exact(files[name], LIMIT_INPUT)
        for runtime in ("onnxruntime", "openvino"):
            y = np.array(got[f"{path}|{runtime}"])
            errors[(name, runtime)] = float(np.abs(y - want).max() / np.abs(want).max())
    print("relative max error on emulated cortex-a72:", errors)
    for name in ("vit-deploy 8-bit weights", "vit-deploy 7-bit weights", "7-bit weights, OpenVINO's uint8 form"):
        for runtime in ("onnxruntime", "openvino"):
            assert errors[(name, runtime)] < 1e-5, (name, runtime, errors)
    # The harness reproduces the overflow: if both runtimes ever get this right, the
    # emulated check no longer proves that vit-deploy's files avoid something real.
    assert max(errors[("-128 x -128", rt)] for rt in ("onnxruntime", "openvino")) > 1e-3, errors


GUEST_OPENVINO = r"""
import json, sys
import numpy as np, openvino as ov
from pathlib import Path
from vit_deploy.backends import openvino_backend as ovb
d, x = Path(sys.argv[1]), np.load(sys.argv[2])
out = {}
for p in ("fp32", "fp16", "int8"):
    with ovb.open(d / f"model.{p}.xml", {"precision": p, "inference_precision_hint": ovb.precision_policy(p)},
                  {"max_batch": 4, "img_size": 8, "threads": 1}) as r:
        out[p] = str(r.compiled.get_property("INFERENCE_PRECISION_HINT"))
        if p == "int8":
            out["int8 runner"] = np.concatenate([r(x), r(x[:1])]).tolist()
core = ov.Core()
for key, ir in (("int8 dynamic", "model.int8.xml"), ("signed int8 dynamic", "model.int8-signed.xml")):
    c = core.compile_model(str(d / ir), "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1})
    req = c.create_infer_request()
    out[key] = np.concatenate([req.infer({0: x})[c.outputs[0]], req.infer({0: x[:1]})[c.outputs[0]]]).tolist()
print(json.dumps(out))
"""


def test_openvino_on_emulated_neoverse_n1(tmp_path):
    """Neoverse N1 has FP16 arithmetic, where OpenVINO's default is f16: the FP32 and INT8
    artifacts compute in f32 and the FP16 one in f16. And the INT8 artifact (uint8 activations
    on its products, backends/openvino_int8.py) is exact through vit-deploy's runner (static
    shapes on ARM) and with its dynamic batch, while the int8-activation IR with its dynamic
    batch is not (the plugin error that made the runner pin shapes on ARM)."""
    import openvino as ov
    import onnxruntime as ort
    from test_openvino_precision import _tiny_onnx
    from vit_deploy.backends import openvino_backend as ovb
    mod, workdir, site = _emulation()
    _tiny_onnx(tmp_path / "m.onnx")
    _tiny_onnx(tmp_path / "m.int8.onnx", int8=True)
    for p in ("fp32", "fp16", "int8"):
        ovb.compile(tmp_path / ("m.int8.onnx" if p == "int8" else "m.onnx"), tmp_path / f"model.{p}.xml", p,
                    {"max_batch": 4})
    ov.save_model(ov.convert_model(str(tmp_path / "m.int8.onnx")), str(tmp_path / "model.int8-signed.xml"))
    x = np.random.default_rng(1).uniform(-3, 3, (4, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # Q/DQ in float: exact
    s = ort.InferenceSession(str(tmp_path / "m.int8.onnx"), so, providers=["CPUExecutionProvider"])
    want = np.concatenate([s.run(None, {"images": x})[0], s.run(None, {"images": x[:1]})[0]])
    root = workdir / "sysroot"
    with open(workdir / ".lock", "w") as lock:
        _lock(lock, workdir)
        python, _ = mod.guest_python(root)
        guest = mod.Guest(shutil.which("qemu-aarch64-static"), root, python, [REPO, site], "neoverse-n1")
        mod.write_cpu_identity(root, mod.probe_cpu(guest))
        r = guest.run(["-c", GUEST_OPENVINO, str(tmp_path), str(tmp_path / "x.npy")], timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    assert {k: got[k] for k in ("fp32", "fp16", "int8")} == \
        {"fp32": "<Type: 'float32'>", "fp16": "<Type: 'float16'>", "int8": "<Type: 'float32'>"}, got
    err = {k: float(np.abs(np.array(got[k]) - want).max() / np.abs(want).max())
           for k in ("int8 runner", "int8 dynamic", "signed int8 dynamic")}
    print("INT8 relative max error on emulated neoverse-n1: " + ", ".join(f"{k} {v:.2e}" for k, v in err.items()))
    assert err["int8 runner"] < 1e-5 and err["int8 dynamic"] < 1e-5
    # the harness still reproduces the plugin's dynamic-shape error: else this proves nothing
    assert err["signed int8 dynamic"] > 1e-3


def _script(*args, path=None):
    import sys
    env = {**os.environ, **({"PATH": str(path)} if path else {})}
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "arm64_check.py"), *map(str, args)],
                       capture_output=True, text=True, env=env, timeout=120)
    return p.returncode, p.stdout, p.stderr


def _fake_bundle(tmp_path, golden=True):
    b = tmp_path / "bundle"
    b.mkdir()
    (b / "manifest.json").write_text("{}")
    if golden:
        (b / "golden.npz").write_bytes(b"")
    return b


def test_script_names_the_debian_packages_when_tools_are_missing(tmp_path):
    from conftest import assert_one_line_error
    empty = tmp_path / "bin"
    empty.mkdir()
    code, _, err = _script(_fake_bundle(tmp_path), "--workdir", tmp_path / "w", path=empty)
    assert_one_line_error(code, err, "qemu-user-static", "mmdebstrap", "apt-get install")
    assert not (tmp_path / "w").exists()


def test_script_lists_the_cpu_models_for_an_unknown_one(tmp_path):
    from conftest import assert_one_line_error
    code, _, err = _script(_fake_bundle(tmp_path), "--cpu", "cortex-a53", "--workdir", tmp_path / "w")
    assert_one_line_error(code, err, "cortex-a53", "cortex-a72", "neoverse-n1", "max,sme=off,sve-default-vector-length=32")


def test_script_says_how_to_make_golden_outputs(tmp_path):
    from conftest import assert_one_line_error
    b = _fake_bundle(tmp_path, golden=False)
    code, _, err = _script(b, "--workdir", tmp_path / "w")
    assert_one_line_error(code, err, "no golden outputs", f"vit-deploy check {b} --max-images 4 --save-golden")
