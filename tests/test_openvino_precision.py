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


def _tiny_onnx(path):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((3 * 8 * 8, 10)).astype(np.float32), "W")
    g = helper.make_graph([helper.make_node("Flatten", ["images"], ["f"]),
                           helper.make_node("MatMul", ["f", "W"], ["logits"])], "tiny",
                          [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


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
    assert y.shape == (2, 10)


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
