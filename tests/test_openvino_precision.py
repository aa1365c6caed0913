"""OpenVINO inference precision (issue 13): FP32 and INT8 artifacts pin f32 on every CPU
(OpenVINO's own default is f16 on ARM, bf16 on x86 with AVX512_BF16 or AMX); the FP16
artifact computes in the half type the CPU has, and f32 where it has none."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ov = pytest.importorskip("openvino")

from vit_deploy.backends import openvino_backend as ovb  # noqa: E402


@pytest.mark.parametrize("caps, machine, want", [
    (["FP32", "FP16", "INT8"], "aarch64", "f16"),          # Neoverse N1, Cortex-A76/A78: FP16 arithmetic
    (["FP32", "INT8"], "aarch64", "f32"),                  # Cortex-A72: none
    (["FP32", "BF16", "FP16", "INT8"], "aarch64", "f16"),  # ARM with both: f16, its native half
    (["WINOGRAD", "FP32", "INT8", "BIN", "EXPORT_IMPORT"], "x86_64", "f32"),  # AVX-512 VNNI, no BF16
    (["FP32", "BF16", "INT8"], "x86_64", "bf16"),          # AVX512_BF16 or AMX
    (["FP32", "BF16", "FP16", "INT8"], "AMD64", "bf16"),
])
def test_half_precision_follows_cpu_capabilities(caps, machine, want):
    assert ovb.half_precision_for(caps, machine) == want


def test_policy_pins_fp32_and_int8():
    assert ovb.precision_policy("fp32") == "f32"
    assert ovb.precision_policy("int8") == "f32"
    assert ovb.precision_policy("fp16") == "half"
    assert ovb.resolve_precision("f32") == "f32"


def tiny_model(int8: bool = False) -> onnx.ModelProto:
    """[batch, 3, 8, 8] -> [batch, 3, 64] @ W [64, 10] -> [batch, 30]: a token-shaped MatMul
    like ViT's, optionally with Q/DQ written by vit-deploy's quantizer."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 10)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([0, 3, 64], np.int64), "tokens"),
             numpy_helper.from_array(np.array([0, 30], np.int64), "flat")]
    g = helper.make_graph([helper.make_node("Reshape", ["images", "tokens"], ["t"], name="tokens"),
                           helper.make_node("MatMul", ["t", "W"], ["y"], name="matmul"),
                           helper.make_node("Reshape", ["y", "flat"], ["logits"], name="flat")], "tiny",
                          [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 30])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    if int8:
        from vit_deploy.quantize import find_targets, insert_qdq
        targets = find_targets(model)
        model = insert_qdq(model, targets, {"t": [2.0, -2.0, 2.0]}, "symmetric", {t.weight: 63 for t in targets})
    return model


def _tiny_onnx(path, int8: bool = False):
    onnx.save(tiny_model(int8), str(path))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_runner_sets_the_precision_it_records(tmp_path, precision):
    """compile() records the policy and what this CPU resolves it to; the runner compiles
    with exactly that hint (read back from the compiled model)."""
    _tiny_onnx(tmp_path / "m.onnx")
    out = tmp_path / f"model.{precision}.xml"
    files, extras = ovb.compile(tmp_path / "m.onnx", out, precision, {"max_batch": 4})
    here = ovb.half_precision_for(ovb.cpu_capabilities(), __import__("platform").machine())
    assert extras["inference_precision_hint"] == ("half" if precision == "fp16" else "f32")
    assert extras["inference_precision_on_build_cpu"] == (here if precision == "fp16" else "f32")
    artifact = {"precision": precision, **extras}
    with ovb.open(out, artifact, {"max_batch": 4, "img_size": 8, "threads": 1}) as r:
        assert r.inference_precision == extras["inference_precision_on_build_cpu"]
        assert r.compiled.get_property("INFERENCE_PRECISION_HINT") == getattr(ov.Type, r.inference_precision)
        y = r(np.ones((2, 3, 8, 8), np.float32))
    assert y.shape == (2, 30)


def test_old_fp16_artifacts_keep_their_recorded_f32(tmp_path):
    """Bundles compiled before half precision recorded f32 for FP16 too: honoured until rebuilt."""
    _tiny_onnx(tmp_path / "m.onnx")
    out = tmp_path / "model.fp16.xml"
    ovb.compile(tmp_path / "m.onnx", out, "fp16", {"max_batch": 4})
    with ovb.open(out, {"precision": "fp16", "inference_precision_hint": "f32"},
                  {"max_batch": 4, "img_size": 8, "threads": 1}) as r:
        assert r.inference_precision == "f32"


def test_info_states_the_inference_precision():
    from vit_deploy.info import format_summary
    arts = [{"backend": "openvino", "precision": p, "path": f"openvino/model.{p}.xml", "sha256": "0" * 64,
             "inference_precision_hint": ovb.precision_policy(p), "inference_precision_on_build_cpu": "bf16"}
            for p in ("fp32", "fp16", "int8")]
    manifest = {"model": {"name": "vit-ti16", "img_size": 8, "num_classes": 10},
                "preprocessing": {"resize_size": 8, "interpolation": "bicubic", "img_size": 8,
                                  "mean": [0.5] * 3, "std": [0.5] * 3},
                "source": {"seed": 0}, "artifacts": arts}
    line = next(ln for ln in format_summary(manifest).splitlines() if ln.startswith("openvino"))
    here = ovb.half_precision_for(ovb.cpu_capabilities(), __import__("platform").machine())
    assert "fp32 f32 (pinned on every CPU)" in line and "int8 f32 (pinned on every CPU)" in line
    assert f"fp16 half where the CPU computes it: {here} on this CPU, bf16 where it was built" in line


def test_static_shapes_give_the_dynamic_models_outputs(tmp_path):
    """The ARM path (one static-shape model per batch size) computes what the dynamic model
    computes here, for each batch size it meets."""
    _tiny_onnx(tmp_path / "m.onnx", int8=True)
    out = tmp_path / "model.int8.xml"
    ovb.compile(tmp_path / "m.onnx", out, "int8", {"max_batch": 4})
    x = np.random.default_rng(1).uniform(-3, 3, (4, 3, 8, 8)).astype(np.float32)
    with ovb.OvRunner(out, 4, 8, "CPU", 1, static_shapes=False) as dyn, \
            ovb.OvRunner(out, 4, 8, "CPU", 1, static_shapes=True) as static:
        for b in (1, 3, 4, 1):
            np.testing.assert_allclose(static(x[:b]), dyn(x[:b]), rtol=1e-5, atol=1e-6)
        assert sorted(static.by_batch) == [1, 3, 4]
        assert all(not c.inputs[0].get_partial_shape().is_dynamic for c, _ in static.by_batch.values())


def _attention_onnx(path, transpose_after_dq: bool):
    """x [N,3,8,8] -> Q/DQ(x) @ K, K = x^T through its own Q/DQ pair (the Transpose before
    the pair, or after it as openvino_int8.sink_attention_transposes leaves timm's K^T):
    an activation x activation product like an attention one."""
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z")]
    k_in, k_out = ("xd2", "kd") if transpose_after_dq else ("kt", "kd")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"])]
    if transpose_after_dq:
        nodes += [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq2"]),
                  helper.make_node("DequantizeLinear", ["xq2", "s", "z"], [k_in]),
                  helper.make_node("Transpose", [k_in], [k_out], perm=[0, 1, 3, 2])]
    else:
        nodes += [helper.make_node("Transpose", ["x"], [k_in], perm=[0, 1, 3, 2]),
                  helper.make_node("QuantizeLinear", [k_in, "s", "z"], ["kq"]),
                  helper.make_node("DequantizeLinear", ["kq", "s", "z"], [k_out])]
    nodes.append(helper.make_node("MatMul", ["xd", k_out], ["y"]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])
    onnx.save(helper.make_model(helper.make_graph(nodes, "attn", [x], [y], inits),
                                opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize("transpose_after_dq", [False, True])
def test_float_attention_products_compute_exactly_where_int8_sums_saturate(tmp_path, transpose_after_dq):
    """Rows of 127 x 127: pairs of products over the int16 that x86 kernels without VNNI add
    them in (in INT8, OpenVINO 2026.4 gave 1020 for 129032 on an AVX2 EPYC with the Transpose
    after the pair, 129032 with it before); in float, exact on any CPU."""
    _attention_onnx(tmp_path / "m.onnx", transpose_after_dq)
    x = np.full((2, 3, 8, 8), 127, np.float32)
    x[1] = np.random.default_rng(0).integers(-128, 128, (3, 8, 8))
    exact = x @ np.swapaxes(x, -1, -2)
    with ovb.OvRunner(tmp_path / "m.onnx", 2, 8, "CPU", 1, static_shapes=False, without_vnni=True) as r:
        assert r.load_rewrites == {"float_attention_products": 1, "signed_activations": 0}
        np.testing.assert_allclose(r(x), exact, rtol=1e-6)
        int8_layers = [(op.get_rt_info()["layerType"].astype(str), op.get_friendly_name())
                       for op in r.compiled.get_runtime_model().get_ordered_ops()
                       if op.get_rt_info()["runtimePrecision"].astype(str) in ("i8", "u8")]
        assert not int8_layers, int8_layers  # however the CPU plugin fuses the product, not in INT8
    with ovb.OvRunner(tmp_path / "m.onnx", 2, 8, "CPU", 1, static_shapes=True, without_vnni=True) as r:
        np.testing.assert_allclose(r(x), exact, rtol=1e-6)  # the ARM path reads the same model


@pytest.mark.parametrize("machine, flags, saturates", [
    ("x86_64", {"avx2", "fma"}, True),                      # AMD EPYC (Zen 2/3), Haswell .. Skylake
    ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, False),  # Cascade Lake and later Xeons
    ("x86_64", {"avx2", "avx_vnni"}, False),                # Alder Lake
    ("x86_64", None, True),                                 # flags unreadable (not Linux): the safe side
    ("aarch64", set(), False),                              # ARM: its own kernels (quantize.py)
])
def test_which_cpus_run_openvino_attention_in_float(machine, flags, saturates, monkeypatch):
    import vit_deploy.cpu as cpu
    monkeypatch.setattr(cpu, "x86_flags", lambda: flags)
    assert cpu.int8_sums_saturate(machine) is saturates
    monkeypatch.setattr(cpu.platform, "machine", lambda: machine)
    assert ovb.without_vnni_here("CPU") is saturates
    assert ovb.without_vnni_here("GPU") is False
