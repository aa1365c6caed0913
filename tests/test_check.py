"""`vit-deploy check`: passes good bundles, catches small damage, golden outputs without torch."""
import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import assert_one_line_error, copy_bundle, run_cli
from vit_deploy import Bundle
from vit_deploy.images import default_calibration_dir, list_images
from vit_deploy.weights import sha256_file

pytest.importorskip("openvino")


def test_good_b16_bundle_passes_with_reports(b16_bundle, b16_check):
    """Issue #6: a good vit-b16 bundle (FP32, FP16, INT8 on ONNX Runtime and OpenVINO) passes,
    exit 0, with JSON, markdown and JUnit reports, five artifacts on 64 images."""
    d, _ = b16_bundle
    r = b16_check
    parity = json.loads((d / "manifest.json").read_text())["parity"]  # the check records what it found
    assert parity["passed"] and parity["images"] == 64 and len(parity["results"]) == 5, parity
    assert r["code"] == 0, r["out"] + r["err"]
    report = r["report"]
    assert report["passed"] and report["images"] == 64 and len(report["results"]) == 5
    assert "| onnxruntime-int8 | int8 |" in (r["dir"] / "r.md").read_text()
    suite = ET.parse(r["dir"] / "r.xml").getroot()
    assert suite.get("tests") == "5" and suite.get("failures") == "0"
    assert "PASS" in r["out"] and "random weights" in r["out"]  # says why top-1 agreement does not gate
    # The time is printed, not asserted: on a shared machine a wall-time assertion fails for
    # reasons that are not the code's (the check's speed is a benchmark's business).
    print(f"check: 5 artifacts, 64 images, {r['seconds']:.1f} s")


def test_vit_b16_artifacts_agree_with_pytorch(b16_bundle, b16_check):
    """Batch 1 and 4 here; the cosine on all 48 calibration photos (and 16 mirrored) comes from
    the check run above, so the photos go through each artifact once. It lives in this file so
    that the bundle's tests share one pytest-xdist worker (`--dist loadfile`)."""
    from test_engines import _agreement, _assert_acceptance
    result = _agreement(b16_bundle[0])
    report = b16_check["report"]
    assert {f"mirrored_{p.name}" for p in list_images(default_calibration_dir())[:16]} <= set(report["image_names"])
    assert set(report["image_names"]) >= {p.name for p in list_images(default_calibration_dir())}
    for r in report["results"]:
        result[r["artifact"]]["min_cosine"] = r["metrics"]["min_cosine"]
    print({k: {m: f"{v:.3g}" if m == "max_abs" else f"{v:.5f}" for m, v in d.items()} for k, d in result.items()})
    _assert_acceptance(result)


def _rehash(d, rel):
    """Make the manifest agree with a file changed on purpose (a bad build, not tampering)."""
    b = Bundle.open(d)
    for a in b.artifacts:
        if rel in a["files"]:
            a["files"][rel] = sha256_file(d / rel)
            if a["path"] == rel:
                a["sha256"] = a["files"][rel]
    (d / "manifest.json").write_text(json.dumps(b.manifest))


def test_catches_one_scaled_weight_tensor(ti_bundle, tmp_path):
    d = copy_bundle(ti_bundle, tmp_path / "b")
    m = onnx.load(str(d / "model.ort.onnx"))
    w = next(t for t in m.graph.initializer if numpy_helper.to_array(t).ndim == 2 and "fc1" in t.name.lower()
             or numpy_helper.to_array(t).shape == (192, 768))
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.02, w.name))
    onnx.save(m, str(d / "model.ort.onnx"))
    _rehash(d, "model.ort.onnx")
    code, out, err = run_cli("check", d)
    assert code == 1, out + err
    assert "onnxruntime-fp32" in err and "max_abs" in err
    assert "onnx-fp32" not in err.replace("onnxruntime-fp32", "")


def test_catches_wrong_mean_std(ti_bundle, tmp_path):
    d = copy_bundle(ti_bundle, tmp_path / "b")
    man = json.loads((d / "manifest.json").read_text())
    man["preprocessing"]["mean"] = [0.485, 0.456, 0.406]
    man["preprocessing"]["std"] = [0.229, 0.224, 0.225]
    (d / "manifest.json").write_text(json.dumps(man))
    code, out, err = run_cli("check", d, "--backends", "onnx")  # every artifact reads the manifest's; one shows it
    assert code == 1 and "max_abs" in err and "min_cosine" in err, out + err


def test_catches_swapped_channel_order(ti_bundle, tmp_path):
    """An INT8 model that reads BGR: a Gather on the channel axis in front of everything."""
    from onnx import helper
    from vit_deploy.backends import openvino_backend
    d = copy_bundle(ti_bundle, tmp_path / "b")
    m = onnx.load(str(d / "model.int8.onnx"))
    g = m.graph
    g.initializer.append(numpy_helper.from_array(np.array([2, 1, 0], np.int64), "bgr_index"))
    for n in g.node:
        for i, name in enumerate(n.input):
            if name == "images":
                n.input[i] = "images_bgr"
    g.node.insert(0, helper.make_node("Gather", ["images", "bgr_index"], ["images_bgr"], axis=1))
    onnx.save(m, str(d / "model.int8.onnx"))
    openvino_backend.compile(d / "model.int8.onnx", d / "openvino" / "model.int8.xml", "int8", {"max_batch": 16})
    _rehash(d, "openvino/model.int8.xml")
    _rehash(d, "openvino/model.int8.bin")
    code, out, err = run_cli("check", d, "--backends", "openvino")
    assert code == 1, out + err
    assert "openvino-int8" in err and "min_cosine" in err


def test_golden_round_trip_without_torch(ti_bundle, tmp_path):
    golden = tmp_path / "golden.npz"
    code, out, err = run_cli("check", ti_bundle, "--save-golden", golden)
    assert code == 0, err
    script = ("import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
              "from vit_deploy.cli import main\n"
              f"sys.argv = ['vit-deploy', 'check', {str(ti_bundle)!r}, '--golden', {str(golden)!r}]\n"
              "main()\n")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "golden:golden.npz" in p.stdout and "FAIL" not in p.stdout


def test_golden_for_another_model_is_refused(ti_bundle, tmp_path):
    golden = tmp_path / "g.npz"
    np.savez(golden, inputs=np.zeros((1, 3, 224, 224), np.float32), logits=np.zeros((1, 1000), np.float32),
             meta=np.array(json.dumps({"model": "vit-b16", "img_size": 224, "num_classes": 1000})))
    code, _, err = run_cli("check", ti_bundle, "--golden", golden)
    assert_one_line_error(code, err, "golden", "vit-b16")


def test_labels_folder(ti_bundle, tmp_path):
    import shutil
    photos = sorted(default_calibration_dir().glob("*.jpg"))
    for c in range(10):
        (tmp_path / "labels" / f"class{c}").mkdir(parents=True)
        shutil.copy(photos[c], tmp_path / "labels" / f"class{c}" / photos[c].name)
    code, out, err = run_cli("check", ti_bundle, "--labels-dir", tmp_path / "labels", "--json", tmp_path / "r.json",
                             "--backends", "onnxruntime")
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert "top1_accuracy" in r["results"][0]["metrics"] and "reference_accuracy" in r
    (tmp_path / "labels" / "class10").mkdir()
    shutil.copy(photos[11], tmp_path / "labels" / "class10" / "x.jpg")
    code, _, err = run_cli("check", ti_bundle, "--labels-dir", tmp_path / "labels")
    assert_one_line_error(code, err, "11 class folders", "10 classes")


def test_unreadable_images_are_skipped_and_listed(ti_bundle, tmp_path):
    import shutil
    (tmp_path / "imgs").mkdir()
    shutil.copy(default_calibration_dir() / "coffee_full.jpg", tmp_path / "imgs")
    (tmp_path / "imgs" / "bad.png").write_bytes(b"garbage")
    code, out, err = run_cli("check", ti_bundle, "--images", tmp_path / "imgs", "--backends", "onnx")
    assert code == 0, err
    assert "bad.png" in err and "skipped" in err


def test_thresholds_override_and_store(ti_bundle, tmp_path):
    d = copy_bundle(ti_bundle, tmp_path / "b")
    code, out, err = run_cli("check", d, "--backends", "onnxruntime", "--set", "int8.min_cosine=0.99999")
    assert code == 1 and "onnxruntime-int8" in err and "min_cosine" in err
    code, _, _ = run_cli("check", d, "--backends", "onnxruntime", "--set", "int8.min_cosine=0.99999", "--store")
    assert code == 1 and json.loads((d / "manifest.json").read_text())["thresholds"]["int8"]["min_cosine"] == 0.99999
    code, _, err = run_cli("check", d, "--backends", "onnxruntime")  # the stored gate applies
    assert code == 1 and "0.99999" in err
    code, _, err = run_cli("check", d, "--set", "int9.cosine=1")
    assert_one_line_error(code, err, "unknown threshold")


def test_each_runner_is_released_before_the_next_opens(ti_bundle, monkeypatch):
    """vit-h14's check peaked at 10 GB while the OpenVINO FP32 runner (5 GB) was still held
    as the next one opened: each runner must drop its runtime objects first."""
    import vit_deploy.backends as backends
    from vit_deploy.parity import check
    opened, real_open = [], backends.open_runner

    def held(runner):
        return [k for k in ("session", "compiled", "request", "model") if getattr(runner, k, None) is not None]

    def recording_open(bundle, artifact, **kw):
        assert not [(r.name, held(r)) for r in opened if held(r)]  # every earlier runner released
        opened.append(real_open(bundle, artifact, **kw))
        return opened[-1]
    monkeypatch.setattr(backends, "open_runner", recording_open)
    check(ti_bundle)
    assert len(opened) >= 6 and not [r.name for r in opened if held(r)]
