"""Issue #8: kills at any moment, concurrent exports, caching, predict, one-line errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import assert_one_line_error, copy_bundle, run_cli
from vit_deploy import Bundle
from vit_deploy.images import default_calibration_dir

EXPORT = ["export", "--model", "vit-ti16", "--img-size", "32", "--num-classes", "4",
          "--target", "onnxruntime", "--precision", "fp32,int8"]


def _export_cmd(out, *extra):
    return [sys.executable, "-m", "vit_deploy.cli", *EXPORT, "--out", str(out), *extra]


def _bundle_ok(d):
    """Complete and intact: every artifact verifies and the check passes."""
    b = Bundle.open(d)
    for a in b.artifacts:
        b.verify(a)
    code, out, err = run_cli("check", d)
    assert code == 0, out + err
    return b


EXPORT_SECONDS = {}


@pytest.fixture(scope="module")
def base_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    t = time.perf_counter()
    subprocess.run(_export_cmd(out), check=True, capture_output=True)
    EXPORT_SECONDS["full"] = time.perf_counter() - t  # nothing to reuse: what a --force export takes here
    return out / "vit-ti16"


@pytest.mark.parametrize("point", ["before-journal", "after-journal", "mid-rename"])
def test_kill_during_commit_leaves_old_or_new(base_bundle, tmp_path, point):
    d = copy_bundle(base_bundle, tmp_path / "vit-ti16")
    before = json.loads((d / "manifest.json").read_text())
    p = subprocess.run(_export_cmd(tmp_path, "--force", "--method", "minmax"), capture_output=True,
                       env={**os.environ, "VIT_DEPLOY_FAULT": point})
    assert p.returncode == -signal.SIGKILL
    b = _bundle_ok(d)
    int8 = b.find("onnx", "int8")["quantization"]["method"]
    if point == "before-journal":
        assert b.manifest["artifacts"] == before["artifacts"]  # as it was
    else:
        assert int8 in ("mse", "minmax")  # earlier stages committed; complete either way
    assert not list(d.glob(".staging-*")) and not (d / ".journal.json").exists()


@pytest.mark.parametrize("moment", [0.1, 0.35, 0.6, 0.85])
def test_sigkill_at_random_moments(base_bundle, tmp_path, moment):
    """Killed at a fraction of this machine's export time, so every kill lands inside the export
    (from the imports to the last commit) on a fast CPU and on a slow one alike."""
    d = copy_bundle(base_bundle, tmp_path / "vit-ti16")
    p = subprocess.Popen(_export_cmd(tmp_path, "--force"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(moment * EXPORT_SECONDS["full"])
    p.send_signal(signal.SIGKILL)
    p.wait()
    _bundle_ok(d)
    # and a fresh export after the kill succeeds
    assert subprocess.run(_export_cmd(tmp_path), capture_output=True).returncode == 0


def test_kill_first_export_then_fresh_export(tmp_path):
    p = subprocess.Popen(_export_cmd(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3.0)
    p.send_signal(signal.SIGKILL)
    p.wait()
    d = tmp_path / "vit-ti16"
    if (d / "manifest.json").exists():
        Bundle.open(d)  # whatever was committed is consistent
    r = subprocess.run(_export_cmd(tmp_path), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _bundle_ok(d)


def test_two_exports_at_once(tmp_path):
    a = subprocess.Popen(_export_cmd(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    # b asks for another INT8 file (another stage key) whose parity passes too. With
    # `--method minmax` (no recipe choice) this random model's file failed the check before
    # GPTQ rounding (0.98955 < 0.99; 0.99598 with it), so whichever export won the race
    # decided the test (stop 23's CI); a calibration size keeps the recipe choice.
    b = subprocess.Popen(_export_cmd(tmp_path, "--calib-size", "24"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    (_, err_a), (_, err_b) = a.communicate(), b.communicate()
    codes = sorted([a.returncode, b.returncode])
    assert codes[0] == 0, err_a + err_b
    if codes[1] != 0:  # refused: one line, exit 2, the first one unharmed
        assert codes[1] == 2
        loser = err_b if b.returncode else err_a
        assert_one_line_error(2, loser, "another vit-deploy process is writing")
    _bundle_ok(tmp_path / "vit-ti16")


def test_rerun_reuses_stages_and_force_rebuilds(base_bundle, tmp_path):
    copy_bundle(base_bundle, tmp_path / "vit-ti16")
    code, out, err = run_cli(*EXPORT, "--out", tmp_path)
    assert code == 0, err
    assert err.count("reusing") >= 4  # onnx, int8, ort fp32, ort int8
    code, out, err = run_cli(*EXPORT, "--out", tmp_path, "--force")
    assert code == 0 and "reusing" not in err
    code, out, err = run_cli(*EXPORT, "--out", tmp_path, "--quiet")
    assert code == 0 and out == "" and "reusing" not in err


def test_summary_and_json_output(base_bundle, tmp_path):
    copy_bundle(base_bundle, tmp_path / "vit-ti16")
    code, out, err = run_cli(*EXPORT, "--out", tmp_path)
    assert "parity     PASSED" in out and "model.int8.ort.onnx" in out and "MB" in out
    code, out, err = run_cli(*EXPORT, "--out", tmp_path, "--json")
    assert code == 0 and json.loads(out)["parity"]["passed"]


def test_predict_with_bundle_labels_and_artifact_path(base_bundle, tmp_path):
    photo = default_calibration_dir() / "chelsea_full.jpg"
    code, out, err = run_cli("predict", base_bundle, photo, photo, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert len(res) == 2 and len(res[0]["top"]) == 4 and res[0]["top"][0]["name"].startswith("class ")
    assert abs(sum(t["probability"] for t in res[0]["top"]) - 1) < 1e-4
    assert res[0]["artifact"] == "onnxruntime-int8"
    code, out, err = run_cli("predict", base_bundle / "model.onnx", photo, "--top", "2")
    assert code == 0 and "(onnx-fp32)" in out, err
    code, out, err = run_cli("predict", base_bundle, photo, "--backend", "onnxruntime-fp32")
    assert code == 0 and "(onnxruntime-fp32)" in out


def test_predict_imagenet_names_for_1000_classes(tmp_path):
    from vit_deploy.predict import class_names
    names = class_names({"model": {"num_classes": 1000, "labels": None}})
    assert names[0] == "tench" and names[207] == "golden retriever" and len(names) == 1000


def test_predict_bad_images(base_bundle, tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    code, _, err = run_cli("predict", base_bundle, tmp_path / "bad.jpg")
    assert_one_line_error(code, err, "bad.jpg", "not a readable image")
    code, _, err = run_cli("predict", base_bundle, tmp_path / "none.jpg")
    assert_one_line_error(code, err, "image not found")


def test_info_shows_a_tampered_file(base_bundle, tmp_path):
    d = copy_bundle(base_bundle, tmp_path / "b")
    code, out, _ = run_cli("info", d)
    assert code == 0 and out.count("sha256 ok") == 4 and "preprocess" in out and "overflow fix all" in out
    with open(d / "model.int8.onnx", "ab") as f:
        f.write(b"\0")
    code, out, _ = run_cli("info", d)
    assert "CHANGED" in out


def test_usage_errors_are_one_line(tmp_path):
    code, _, err = run_cli("export", "--model")
    assert_one_line_error(code, err, "--model")
    code, _, err = run_cli("export", "--target", "coreml", "--out", tmp_path)
    assert_one_line_error(code, err, "unknown target 'coreml'")
    code, _, err = run_cli("export", "--calib-dir", tmp_path / "none", "--model", "vit-ti16", "--img-size", "32",
                           "--target", "onnxruntime", "--out", tmp_path)
    assert_one_line_error(code, err, "not found")
