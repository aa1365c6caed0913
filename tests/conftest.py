import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for the TensorRT stand-in

# Tests never touch the network: the hub client must fail fast if asked.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def calib_dir():
    from vit_deploy.images import default_calibration_dir
    return default_calibration_dir()


def run_cli(*args, env=None, cwd=None, timeout=900):
    """Run the real console entry in a subprocess: exit code, stdout, stderr."""
    import subprocess
    # a crash in a runtime's native code (SIGSEGV) then leaves the Python stack in stderr
    full_env = {**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})}
    p = subprocess.run([sys.executable, "-m", "vit_deploy.cli", *map(str, args)], capture_output=True,
                       text=True, env=full_env, cwd=cwd, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def assert_one_line_error(code, stderr, *needles):
    assert code == 2, f"exit {code}, stderr: {stderr}"
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip() and not ln.startswith(("warning:", "["))]
    assert len(lines) == 1, f"expected one line, got: {stderr}"
    assert "Traceback" not in stderr
    for n in needles:
        assert n.lower() in lines[0].lower(), f"{n!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="session")
def ti_bundle(tmp_path_factory):
    """A small complete bundle: vit-ti16 at 64 px, ONNX Runtime + OpenVINO, FP32/FP16/INT8, checked."""
    from vit_deploy.pipeline import export
    out = tmp_path_factory.mktemp("ti")
    export(model="vit-ti16", num_classes=10, img_size=64, target="onnxruntime,openvino",
           precision="fp32,fp16,int8", out=out, max_batch=16, quiet=True)
    return out / "vit-ti16"


@pytest.fixture(scope="session")
def b16_bundle(tmp_path_factory):
    """The README's job through the library: vit-b16, ONNX Runtime + OpenVINO, FP32/FP16/INT8.
    Checked by b16_check (64 images) instead of the export's own check (16 images): the same
    code, run once on this model. The export's check stage is tested on the smaller bundles."""
    from vit_deploy.pipeline import export
    out = tmp_path_factory.mktemp("b16")
    manifest = export(model="vit-b16", target="onnxruntime,openvino", precision="fp32,fp16,int8", out=out,
                      check=False, quiet=True)
    return out / "vit-b16", manifest


def copy_bundle(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def b16_check(b16_bundle, tmp_path_factory):
    """`vit-deploy check` on the b16 bundle's five ONNX Runtime and OpenVINO artifacts with 64
    images (the 48 calibration files and 16 of them mirrored), timed, with every report format.
    Shared by the check tests (issue 6) and the engine agreement test (issue 5)."""
    import json
    import shutil
    import time
    from PIL import Image, ImageOps
    d, _ = b16_bundle
    tmp = tmp_path_factory.mktemp("b16check")
    from vit_deploy.images import default_calibration_dir
    photos = sorted(default_calibration_dir().glob("*.jpg"))
    (tmp / "imgs").mkdir()
    for p in photos:
        shutil.copy(p, tmp / "imgs")
    for p in photos[:64 - len(photos)]:
        ImageOps.mirror(Image.open(p)).save(tmp / "imgs" / f"mirrored_{p.name}")
    t = time.perf_counter()
    code, out, err = run_cli("check", d, "--images", tmp / "imgs", "--max-images", "64", "--backends",
                             "onnxruntime,openvino", "--json", tmp / "r.json", "--markdown", tmp / "r.md",
                             "--junit", tmp / "r.xml")
    seconds = time.perf_counter() - t
    report = json.loads((tmp / "r.json").read_text()) if (tmp / "r.json").exists() else None
    return {"code": code, "out": out, "err": err, "seconds": seconds, "report": report, "dir": tmp}

