"""The package as users get it (issue 13): a built wheel holds the calibration photos
and data files, and a core-only install (no torch, no export extra) runs a bundle
made elsewhere: info, predict, check --golden, bench, quantize (on the wheel's own
photos) and compile, while export and a check against PyTorch name the extra, exit 2.

The core-only venv is made offline: the wheel goes into an empty venv without its
dependencies; the core's (numpy, onnx, onnxruntime, pillow, click) come from this
environment's site-packages through a .pth file, with every package of the export
extra (and OpenVINO, an extra too) made unimportable, as on a fresh core install.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, assert_one_line_error

# Not installed by the core: the export extra and the optional runtimes.
NOT_IN_CORE = ("torch", "torchvision", "timm", "transformers", "onnxsim", "safetensors", "huggingface_hub", "openvino")
BLOCKER = f'''"""Installed by tests/test_install.py: packages outside vit-deploy's core cannot be imported."""
import sys

BLOCKED = {set(NOT_IN_CORE)!r}


class CoreOnly:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not in the core install)", name=name)
        return None


sys.meta_path.insert(0, CoreOnly())
'''


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """vit-deploy's wheel, built from a copy of the source (the checkout stays clean)."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed: cannot build the wheel without network")
    from importlib.metadata import version
    if int(version("setuptools").split(".")[0]) < 77:  # the SPDX `license = "..."` field (PEP 639)
        pytest.skip(f"setuptools {version('setuptools')} is older than 77: cannot build the wheel without network")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "vit_deploy", src / "vit_deploy", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    (whl,) = (tmp / "dist").glob("vit_deploy-*.whl")
    return whl


def test_wheel_holds_every_package_file_and_the_photos(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    src = wheel.parent.parent / "src"  # the copy of the checkout the wheel was built from
    files = {p.relative_to(src).as_posix() for p in (src / "vit_deploy").rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    assert files - names == set(), "package files missing from the wheel"
    photos = {n for n in names if n.startswith("vit_deploy/data/calibration/") and n.endswith(".jpg")}
    assert len(photos) == 48
    assert {"vit_deploy/data/calibration/ATTRIBUTION.md", "vit_deploy/data/imagenet_classes.txt"} <= names
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    core = [ln.split(":", 1)[1].strip() for ln in meta.splitlines()
            if ln.startswith("Requires-Dist:") and "extra ==" not in ln]
    assert core and not [d for d in core if d.split(">")[0].split("=")[0].strip() in NOT_IN_CORE], core
    assert 'torch>=2.1; extra == "export"' in meta


@pytest.fixture(scope="module")
def core_venv(wheel, tmp_path_factory) -> Path:
    """A venv holding the wheel and nothing of the export extra; returns its bin/ directory."""
    tmp = tmp_path_factory.mktemp("corevenv")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    p = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                        str(wheel)], capture_output=True, text=True, timeout=300)
    if p.returncode and "no such option: --python" in p.stderr:
        pytest.skip("pip too old for --python (needs 22.3)")
    assert p.returncode == 0, p.stdout + p.stderr
    purelib = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    parents = dict.fromkeys(site.getsitepackages() + [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (purelib / "_core_only.py").write_text(BLOCKER)
    (purelib / "_core_only.pth").write_text("import _core_only\n")
    # Entries of a .pth file go after the venv's own site-packages: the wheel's vit_deploy wins.
    (purelib / "zz_parent_site.pth").write_text("\n".join(p for p in parents if Path(p).is_dir()) + "\n")
    return venv / "bin"


@pytest.fixture(scope="module")
def foreign_bundle(tmp_path_factory):
    """A bundle and golden outputs made with the full install (torch), then copied away."""
    from vit_deploy.parity import check
    from vit_deploy.pipeline import export
    tmp = tmp_path_factory.mktemp("made_elsewhere")
    export(model="vit-ti16", num_classes=10, img_size=32, target="onnxruntime", precision="fp32,int8",
           out=tmp / "x86", max_batch=4, calib_size=8, check=False, quiet=True)
    check(tmp / "x86" / "vit-ti16", save_golden_to=tmp / "golden.npz", max_images=6, record=False)
    shutil.copytree(tmp / "x86" / "vit-ti16", tmp / "box" / "vit-ti16")
    shutil.rmtree(tmp / "x86")
    return tmp / "box" / "vit-ti16", tmp / "golden.npz"


def run_core(bin_dir: Path, *args, cwd=None):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["VIT_DEPLOY_CACHE"] = str(bin_dir.parent / "cache")
    p = subprocess.run([str(bin_dir / args[0]), *map(str, args[1:])], capture_output=True, text=True, env=env,
                       cwd=cwd or bin_dir.parent, timeout=600)
    assert "Traceback" not in p.stderr, p.stderr
    return p.returncode, p.stdout, p.stderr


def test_core_install_has_no_torch_and_runs_from_the_wheel(core_venv):
    code, out, err = run_core(core_venv, "python", "-c", (
        "import importlib.util, vit_deploy\n"
        "from vit_deploy.images import default_calibration_dir, list_images\n"
        "print(vit_deploy.__file__)\n"
        "print(len(list_images(default_calibration_dir())))\n"
        "try:\n    import torch\nexcept ImportError:\n    print('no torch')\n"))
    assert code == 0, err
    file, photos, torch = out.strip().splitlines()
    assert Path(file).resolve().is_relative_to(core_venv.parent.resolve())  # the wheel's copy, not the checkout
    assert photos == "48" and torch == "no torch"


def test_core_install_runs_a_bundle_made_elsewhere(core_venv, foreign_bundle, tmp_path):
    bundle, golden = foreign_bundle
    photo = next((core_venv.parent / "lib").glob("python3*/site-packages/vit_deploy/data/calibration/chelsea_full.jpg"))

    code, out, err = run_core(core_venv, "vit-deploy", "info", bundle)
    assert code == 0, err
    assert "onnxruntime-int8" in out and "sha256 ok" in out and "CHANGED" not in out

    code, out, err = run_core(core_venv, "vit-deploy", "predict", bundle, photo, "--top", "3")
    assert code == 0, err
    assert "(onnxruntime-int8)" in out and len([ln for ln in out.splitlines() if "%" in ln]) == 3

    code, out, err = run_core(core_venv, "vit-deploy", "check", bundle, "--golden", golden)
    assert code == 0, err + out
    assert "reference golden:golden.npz" in out and out.count("PASS") == 4  # onnx + onnxruntime, fp32 + int8

    code, out, err = run_core(core_venv, "vit-deploy", "bench", bundle, "--iters", "2", "--warmup", "1")
    assert code == 0, err
    assert "onnxruntime-int8" in out and "torch-fp32" not in out
    assert "left out the PyTorch eager reference" in err and "vit-deploy[export]" in err

    # quantize on the photos installed with the wheel (the default calibration directory)
    code, out, err = run_core(core_venv, "vit-deploy", "quantize", bundle / "model.onnx", "--calib-size", "4",
                              "--out", tmp_path / "q.onnx")
    assert code == 0, err
    assert (tmp_path / "q.onnx").is_file() and "matrix products in INT8" in out

    code, out, err = run_core(core_venv, "vit-deploy", "compile", bundle, "--target", "onnxruntime", "--force")
    assert code == 0, err
    assert "onnxruntime-fp32" in out and "onnxruntime-int8" in out


@pytest.mark.parametrize("args, needles", [
    (("export", "--model", "vit-ti16", "--img-size", "32"), ("export needs PyTorch", "vit-deploy[export]")),
    (("models",), ("needs PyTorch", "vit-deploy[export]")),
    (("check", "{bundle}"), ("needs PyTorch", "vit-deploy[export]", "--golden")),
    (("bench", "{bundle}", "--backends", "torch"), ("needs PyTorch", "vit-deploy[export]")),
])
def test_core_install_names_the_export_extra(core_venv, foreign_bundle, tmp_path, args, needles):
    bundle, _ = foreign_bundle
    code, out, err = run_core(core_venv, "vit-deploy", *[str(a).format(bundle=bundle) for a in args], cwd=tmp_path)
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "models").exists()  # export stopped before making anything
