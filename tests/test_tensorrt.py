"""TensorRT: the build logic against a stand-in here; real engines wherever TensorRT and a GPU exist."""
import shlex
import sys

import pytest

import trt_standin
from conftest import assert_one_line_error, run_cli
from vit_deploy import UserError
from vit_deploy.backends import tensorrt_backend as tb


def _has_real_tensorrt():
    try:
        import tensorrt  # noqa: F401
        from cuda.bindings import runtime as cudart  # noqa: F401
        return cudart.cudaGetDeviceCount()[1] > 0
    except Exception:
        return False


real_trt = pytest.mark.skipif(not _has_real_tensorrt(), reason="needs TensorRT and an NVIDIA GPU")


@pytest.mark.parametrize("version", ["10.3.0", "11.4.0"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_always_strongly_typed_and_profile_from_options(version, precision):
    plan = tb.plan_build(version, precision, img_size=224, max_batch=16, opt_batch=4)
    assert plan["strongly_typed"] is True and plan["precision"] == precision
    assert plan["profile"] == {"input": "images", "min": (1, 3, 224, 224), "opt": (4, 3, 224, 224),
                               "max": (16, 3, 224, 224)}


def test_trtexec_line_mirrors_the_plan():
    plan = tb.plan_build("10.3.0", "int8", img_size=384, max_batch=8, workspace_mb=1024, dla_core=0,
                         onnx_file="model.int8.onnx", engine_file="model.int8.engine")
    args = shlex.split(plan["trtexec"])
    assert args[0] == "trtexec" and "--onnx=model.int8.onnx" in args and "--saveEngine=model.int8.engine" in args
    assert "--minShapes=images:1x3x384x384" in args and "--maxShapes=images:8x3x384x384" in args
    assert "--stronglyTyped" in args and "--useDLACore=0" in args and "--memPoolSize=workspace:1024M" in args
    assert "--timingCacheFile=trt.timing-cache" in args
    # 11.x: strongly typed always, the flag is gone; no weak-typing precision flags anywhere
    assert "--stronglyTyped" not in tb.plan_build("11.4.0", "int8", img_size=224, max_batch=8)["trtexec"]
    fp16 = shlex.split(tb.plan_build("10.3.0", "fp16", img_size=224, max_batch=8, onnx_file="model.fp16.onnx")["trtexec"])
    assert "--stronglyTyped" in fp16 and "--fp16" not in fp16 and "--onnx=model.fp16.onnx" in fp16


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="too old"):
        tb.plan_build("8.6.1", "int8", img_size=224, max_batch=8)
    with pytest.raises(UserError, match="opt-batch"):
        tb.plan_build("10.3.0", "int8", img_size=224, max_batch=8, opt_batch=9)


def _tiny_onnx(tmp_path):
    from vit_deploy import build_model
    from vit_deploy.onnx_export import export_onnx
    p = tmp_path / "model.onnx"
    export_onnx(build_model("vit-ti16", num_classes=4, img_size=32), p)
    return p


@pytest.mark.parametrize("version,precision", [("10.3.0", "fp16"), ("10.3.0", "int8"), ("11.4.0", "int8")])
def test_build_engine_tells_the_builder_what_the_plan_says(tmp_path, version, precision):
    trt = trt_standin.make(version)
    onnx_path = _tiny_onnx(tmp_path)
    plan = tb.plan_build(version, precision, img_size=32, max_batch=8, opt_batch=2, dla_core=1)
    cache = tmp_path / "trt.timing-cache"
    cache.write_bytes(b"old")
    engine = tb.build_engine(trt, onnx_path, plan, cache)
    assert engine == b"STANDIN-ENGINE"
    net, cfg = trt.last_build["network"], trt.last_build["config"]
    strong = bool(net.flags & (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
    assert strong is plan["strongly_typed"]
    assert cfg.profiles[0].shapes["images"] == ((1, 3, 32, 32), (2, 3, 32, 32), (8, 3, 32, 32))
    assert cfg.pools[trt.MemoryPoolType.WORKSPACE] == 2048 << 20
    assert cfg.default_device_type == trt.DeviceType.DLA and cfg.DLA_core == 1
    assert not cfg.flags - {trt.BuilderFlag.GPU_FALLBACK}  # no weak-typing precision flags
    assert all(l.precision is None for l in net.layers)  # precision comes from the ONNX, not from layers
    assert cache.read_bytes() == b"old+timed"  # the warm cache was read and the new one written


def test_compile_records_the_engine_in_the_manifest(tmp_path, monkeypatch):
    """`vit-deploy compile --target tensorrt` through the whole stage, against the stand-in."""
    from vit_deploy import Bundle
    from vit_deploy.compile import compile_bundle
    from vit_deploy.pipeline import export
    export(model="vit-ti16", num_classes=4, img_size=32, out=tmp_path, check=False, quiet=True)
    monkeypatch.setitem(sys.modules, "tensorrt", trt_standin.make("10.3.0"))
    manifest = compile_bundle(tmp_path / "vit-ti16", target="tensorrt", precision="fp32", quiet=True)
    art = next(a for a in manifest["artifacts"] if a["backend"] == "tensorrt")
    assert art["path"] == "tensorrt/model.fp32.engine" and art["runtime_version"] == "10.3.0"
    assert art["trtexec"].startswith("trtexec --onnx=model.onnx")
    assert (tmp_path / "vit-ti16" / "tensorrt" / "trt.timing-cache").is_file()
    b = Bundle.open(tmp_path / "vit-ti16")
    assert b.verify(art).read_bytes() == b"STANDIN-ENGINE"


def test_compile_file_builds_an_engine_for_the_file_s_own_input(tmp_path, monkeypatch):
    """`vit-deploy compile FILE.onnx --target tensorrt` on a file from another tool: the
    profile names that file's input (not vit-deploy's "images"), the engine goes beside it."""
    import onnx

    from vit_deploy.compile import compile_file
    src = _tiny_onnx(tmp_path)
    m = onnx.load(str(src))
    old = m.graph.input[0].name
    for n in m.graph.node:
        n.input[:] = ["pixel_values" if i == old else i for i in n.input]
    m.graph.input[0].name = "pixel_values"
    onnx.save(m, str(tmp_path / "foreign.onnx"))
    monkeypatch.setitem(sys.modules, "tensorrt", trt_standin.make("10.3.0"))
    written = compile_file(tmp_path / "foreign.onnx", target="tensorrt")
    assert [p.name for p in written] == ["foreign.engine"] and written[0].read_bytes() == b"STANDIN-ENGINE"
    assert (tmp_path / "trt.timing-cache").is_file()
    assert sys.modules["tensorrt"].last_build["config"].profiles[0].shapes["pixel_values"][0] == (1, 3, 32, 32)


@pytest.mark.skipif(_has_real_tensorrt(), reason="this machine has TensorRT")
def test_missing_tensorrt_is_one_line_exit_2(tmp_path):
    code, _, err = run_cli("export", "--model", "vit-b16", "--target", "tensorrt", "--out", tmp_path)
    assert_one_line_error(code, err, "TensorRT", "JetPack", "--target openvino")
    assert not (tmp_path / "vit-b16" / "model.onnx").exists()  # refused before any work


@pytest.mark.tensorrt
@real_trt
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_real_engine_matches_reference(tmp_path, precision):
    from vit_deploy.parity import check
    from vit_deploy.pipeline import export
    export(model="vit-ti16", num_classes=10, img_size=64, target="tensorrt", precision=precision, out=tmp_path,
           max_batch=8, check=False, quiet=True)
    report = check(tmp_path / "vit-ti16", backends=["tensorrt"], record=False)
    assert report["passed"], report


@pytest.mark.parametrize("version", ["10.3.0", "11.4.0"])
def test_tensorrt_fp16_and_int8_from_their_own_onnx(tmp_path, monkeypatch, version):
    """--target tensorrt means FP16 + INT8: FP16 from model.fp16.onnx (LayerNorm in FP32), INT8 from Q/DQ."""
    from vit_deploy.pipeline import export
    trt = trt_standin.make(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    m = export(model="vit-ti16", num_classes=4, img_size=32, target="tensorrt", out=tmp_path, check=False, quiet=True)
    arts = {(a["backend"], a["precision"]): a for a in m["artifacts"]}
    assert set(arts) == {("onnx", "fp32"), ("onnx", "fp16"), ("onnx", "int8"), ("tensorrt", "fp16"), ("tensorrt", "int8")}
    assert arts[("tensorrt", "fp16")]["source"] == "model.fp16.onnx"
    assert arts[("tensorrt", "int8")]["source"] == "model.int8.onnx"
    assert "--onnx=model.fp16.onnx" in arts[("tensorrt", "fp16")]["trtexec"]
    parsed = [c[1] for c in trt.calls if c[0] == "parse"]
    assert any(p.endswith("model.fp16.onnx") for p in parsed) and any(p.endswith("model.int8.onnx") for p in parsed)
