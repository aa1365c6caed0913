"""Runtime artifacts from one bundle: agreement with PyTorch, determinism, missing runtimes,
tampered files, batch limits."""
import json
import sys

import numpy as np
import pytest

from conftest import assert_one_line_error, copy_bundle, run_cli
from vit_deploy import Bundle, UserError
from vit_deploy.backends import open_runner
from vit_deploy.images import default_calibration_dir, list_images, load_images
from vit_deploy.pipeline import build_reference, export
from vit_deploy.quantize import cosine

pytest.importorskip("openvino")


def _agreement(bundle_dir, photos: int = 0):
    """max abs vs PyTorch at batch 1 and 4 (FP32), and cosine on the first `photos` calibration photos."""
    b = Bundle.open(bundle_dir)
    model = build_reference(b.manifest)
    import torch
    out = {}
    rnd = np.random.default_rng(0).standard_normal((4, 3, 224, 224)).astype(np.float32)
    x = load_images(list_images(default_calibration_dir())[:photos], model.preprocessing)[0] if photos else rnd[:0]
    with torch.no_grad():
        ref_rnd = model(torch.from_numpy(rnd)).numpy()
        ref_photos = [model(torch.from_numpy(x[i:i + 8])).numpy() for i in range(0, len(x), 8)]
    for a in b.artifacts:
        if a["backend"] == "onnx":
            continue  # the source files: the export verified them, and ONNX Runtime's artifacts are their builds
        with open_runner(b, a) as r:
            diffs = [float(np.abs(r(rnd[:n]) - ref_rnd[:n]).max()) for n in (1, 4)]
            got = [r(x[i:i + 8]) for i in range(0, len(x), 8)]
        m = {"max_abs": max(diffs)}
        if photos:
            m["min_cosine"] = float(cosine(np.concatenate(ref_photos), np.concatenate(got)).min())
        out[f"{a['backend']}-{a['precision']}"] = m
    return out


def _assert_acceptance(result, artifacts=("onnxruntime-fp32", "openvino-fp32", "openvino-fp16", "onnxruntime-int8",
                                           "openvino-int8")):
    for name, m in result.items():
        if name.endswith("fp32"):
            assert m["max_abs"] <= 1e-3, (name, m)
        elif name.endswith("fp16"):
            assert m["min_cosine"] >= 0.999, (name, m)
        else:
            assert m["min_cosine"] >= 0.99, (name, m)
    assert set(artifacts) <= set(result)


# The vit-b16 bundle's agreement test is in test_check.py, beside the check tests on the same
# bundle: pytest-xdist (--dist loadfile) then builds that bundle once.


@pytest.mark.heavy
def test_r50_vit_b16_artifacts_agree_with_pytorch(tmp_path):
    """The hybrid from a timm checkpoint, once through every stage: its ONNX equals timm's
    model (test_export's check), and its FP32 and INT8 artifacts agree with PyTorch. FP16 is
    the vit-b16 bundle's test: the same code path, on a smaller model."""
    pytest.importorskip("timm")
    from test_export import assert_export_matches_timm, timm_checkpoint
    ref = timm_checkpoint("vit_base_r50_s16_224", tmp_path / "w.pth")
    manifest = export(model="r50-vit-b16", weights=str(tmp_path / "w.pth"), target="onnxruntime,openvino",
                      precision="fp32,int8", out=tmp_path, check=False, quiet=True)
    assert_export_matches_timm(manifest, tmp_path / "r50-vit-b16" / "model.onnx", ref, "r50-vit-b16")
    del ref
    result = _agreement(tmp_path / "r50-vit-b16", photos=16)
    print({k: {m: f"{v:.3g}" if m == "max_abs" else f"{v:.5f}" for m, v in d.items()} for k, d in result.items()})
    _assert_acceptance(result, ("onnxruntime-fp32", "openvino-fp32", "onnxruntime-int8", "openvino-int8"))


def _hashes(d):
    b = Bundle.open(d)
    return {rel: sha for a in b.artifacts for rel, sha in a["files"].items()}


def test_same_bundle_twice_is_byte_identical(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_DEPLOY_CACHE", str(tmp_path / "cache"))
    kw = dict(model="vit-ti16", num_classes=10, img_size=32, target="onnxruntime,openvino",
              precision="fp32,fp16,int8", check=False, quiet=True)
    export(out=tmp_path / "a", **kw)
    monkeypatch.setenv("VIT_DEPLOY_CACHE", str(tmp_path / "cache2"))  # calibration recomputed too
    export(out=tmp_path / "b", **kw)
    a, b = _hashes(tmp_path / "a" / "vit-ti16"), _hashes(tmp_path / "b" / "vit-ti16")
    assert a == b, {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}
    assert len(a) >= 9  # onnx x2, ort x2, openvino xml+bin x3


def test_target_all_builds_what_it_can(tmp_path):
    code, out, err = run_cli("export", "--model", "vit-ti16", "--img-size", "32", "--num-classes", "3",
                             "--target", "all", "--out", tmp_path)
    assert code == 0, err
    manifest = json.loads((tmp_path / "vit-ti16" / "manifest.json").read_text())
    have = {(a["backend"], a["precision"]) for a in manifest["artifacts"]}
    assert {("onnxruntime", "fp32"), ("openvino", "fp16"), ("openvino", "int8")} <= have
    if not any(b == "tensorrt" for b, _ in have):
        assert manifest["skipped_targets"][0]["runtime"] == "tensorrt"
        assert "skipped tensorrt" in out
    assert manifest["parity"]["passed"]


def test_runtime_missing_is_reported_when_asked_not_at_import(ti_bundle, tmp_path):
    code = (
        "import sys; sys.modules['openvino'] = None\n"
        "import vit_deploy\n"
        "from vit_deploy import Bundle\n"
        "from vit_deploy.backends import open_runner\n"
        f"b = Bundle.open({str(ti_bundle)!r})\n"
        "a = b.find('openvino', 'fp32')\n"
        "try:\n    open_runner(b, a)\nexcept vit_deploy.UserError as e:\n    print('ERR', e)\n"
    )
    import subprocess
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "ERR OpenVINO is not installed" in p.stdout


def test_batch_over_max_is_a_clear_error(ti_bundle):
    b = Bundle.open(ti_bundle)
    with open_runner(b, b.find("onnxruntime", "fp32")) as r:
        r(np.zeros((16, 3, 64, 64), np.float32))
        with pytest.raises(UserError, match="batch 17 is outside 1..16"):
            r(np.zeros((17, 3, 64, 64), np.float32))
        with pytest.raises(UserError, match="expects images of shape"):
            r(np.zeros((1, 3, 32, 32), np.float32))


def test_tampered_artifact_is_never_run(ti_bundle, tmp_path):
    d = copy_bundle(ti_bundle, tmp_path / "bundle")
    bin_file = d / "openvino" / "model.int8.bin"
    data = bytearray(bin_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bin_file.write_bytes(bytes(data))
    for args in (["check", d], ["bench", d, "--iters", "1", "--warmup", "0"],
                 ["predict", d, default_calibration_dir() / "chelsea_full.jpg", "--backend", "openvino-int8"]):
        code, _, err = run_cli(*args)
        assert_one_line_error(code, err, "model.int8.bin", "sha256")


def test_missing_manifest(tmp_path):
    code, _, err = run_cli("check", tmp_path)
    assert_one_line_error(code, err, "manifest.json")


def test_engine_from_another_tensorrt_version(tmp_path, monkeypatch):
    import trt_standin
    from vit_deploy.backends import tensorrt_backend as tb
    monkeypatch.setitem(sys.modules, "tensorrt", trt_standin.make("10.4.0"))
    (tmp_path / "e.engine").write_bytes(b"x")
    with pytest.raises(UserError, match="built with TensorRT 10.3.0, this machine has 10.4.0"):
        tb.TrtRunner(tmp_path / "e.engine", {"runtime_version": "10.3.0"}, 8, 224)


def test_a_graph_openvino_cannot_read_is_one_line(tmp_path):
    """Some foreign exports trip OpenVINO's ONNX frontend (a trained conv-attention hybrid from
    PyPI did, FP32 as well as INT8): the file's limit on that runtime, said in one line."""
    from vit_deploy.backends.openvino_backend import _read

    def convert():
        raise RuntimeError("Exception from src/inference/src/cpp/core.cpp:84:\nCheck 'false' failed at x.cpp:151:\n"
                           "Model wasn't fully converted. Failed operations detailed log:\n-- Concat-17 with a message:\n"
                           "Argument shapes are inconsistent\n\nSummary:\n-- Conversion is failed for: Concat-17\n")
    with pytest.raises(UserError) as e:
        _read(convert, tmp_path / "hybrid.onnx")
    line = str(e.value)
    assert "\n" not in line and "hybrid.onnx" in line and "OpenVINO" in line and "Concat-17" in line
