"""ONNX export: dynamic batch, LayerNorm as one op, folded weight standardization,
metadata, manifest, verification, bad input, atomic writes."""
import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from conftest import assert_one_line_error, run_cli
from vit_deploy import Bundle
from vit_deploy.onnx_export import ort_session
from vit_deploy.pipeline import export

timm = pytest.importorskip("timm")


def _ops(path):
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles")
    manifest = export(model="vit-ti16", num_classes=10, img_size=64, out=out, check=False, quiet=True)
    return out / "vit-ti16", manifest


def assert_export_matches_timm(manifest, path, ref, name):
    """The exported ONNX equals timm's eager model within 1e-4 at batch 1 and 4, with
    LayerNorm as one op (and, for the hybrid, weight standardization folded)."""
    sess = ort_session(path)
    for batch in (1, 4):
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = ref(x).numpy()
        got = sess.run(None, {"images": x.numpy()})[0]
        print(f"{name} batch {batch}: ONNX Runtime vs PyTorch max abs {np.abs(got - want).max():.2e}")
        assert np.abs(got - want).max() <= 1e-4, (name, batch, np.abs(got - want).max())
    onnx_art = manifest["artifacts"][0]
    assert onnx_art["verification"]["batch4_max_abs_diff"] <= 1e-4
    ops = _ops(path)
    layers = manifest["model"]["layers"]
    assert ops["LayerNormalization"] == 2 * layers + 1 and "ReduceMean" not in ops and "Pow" not in ops
    if name == "r50-vit-b16":
        # weight standardization folded: no statistics over conv weights in the graph
        convs_on_weights = [n for n in onnx.load(str(path)).graph.node if n.op_type in ("ReduceMean", "Sqrt")]
        assert not convs_on_weights


def timm_checkpoint(timm_name, path):
    torch.manual_seed(0)
    ref = timm.create_model(timm_name, num_classes=1000).eval()
    torch.save(ref.state_dict(), path)
    return ref


@pytest.mark.parametrize("timm_name,name", [
    ("vit_base_patch16_224", "vit-b16"), ("vit_base_patch32_224", "vit-b32"),
    # r50-vit-b16: test_engines exports it from a timm checkpoint to every artifact and checks
    # this there. vit-l16 takes vit-b16's path at 3.5x the cost (127 s of suite time): its weight
    # mapping is checked in test_reference_parity, its export in benchmarks/export_time.py
])
def test_onnxruntime_matches_pytorch_at_batch_1_and_4(tmp_path, timm_name, name):
    ref = timm_checkpoint(timm_name, tmp_path / "w.pth")
    manifest = export(model=name, weights=str(tmp_path / "w.pth"), out=tmp_path, check=False, quiet=True)
    assert_export_matches_timm(manifest, tmp_path / name / "model.onnx", ref, name)


def test_graph_interface_and_metadata(tiny_bundle):
    bundle_dir, manifest = tiny_bundle
    model = onnx.load(str(bundle_dir / "model.onnx"))
    assert model.opset_import[0].version == 17
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "images" and out.name == "logits"
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert out.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == [3, 64, 64]
    meta = {p.key: p.value for p in model.metadata_props}
    pre = json.loads(meta["vit_deploy.preprocessing"])
    assert pre["img_size"] == 64 and pre["mean"] == [0.5, 0.5, 0.5] and pre["interpolation"] == "bicubic"
    assert json.loads(meta["vit_deploy.num_classes"]) == 10
    versions = json.loads(meta["vit_deploy.versions"])
    assert versions["torch"] and versions["onnx"] and versions["vit-deploy"]
    assert manifest["preprocessing"] == pre


def test_manifest_lists_artifacts_with_hashes(tiny_bundle):
    bundle_dir, _ = tiny_bundle
    b = Bundle.open(bundle_dir)
    art = b.find("onnx", "fp32")
    assert {"backend", "precision", "path", "sha256"} <= set(art)
    b.verify(art)
    assert art["simplified"] and "batch1_max_abs_diff" in art["verification"]


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_dynamic_batch_any_size(tiny_bundle, batch):
    bundle_dir, _ = tiny_bundle
    x = np.random.default_rng(batch).standard_normal((batch, 3, 64, 64)).astype(np.float32)
    assert ort_session(bundle_dir / "model.onnx").run(None, {"images": x})[0].shape == (batch, 10)


@pytest.mark.parametrize("opset", [14, 20])
def test_other_opsets(tmp_path, opset):
    export(model="vit-ti16", num_classes=3, img_size=32, opset=opset, out=tmp_path, check=False, quiet=True)
    ops = _ops(tmp_path / "vit-ti16" / "model.onnx")
    assert onnx.load(str(tmp_path / "vit-ti16" / "model.onnx")).opset_import[0].version == opset
    assert ("LayerNormalization" in ops) == (opset >= 17)


def test_simplifier_failure_keeps_the_unsimplified_model(tmp_path, monkeypatch, caplog):
    import onnxsim

    def broken(*a, **k):
        raise RuntimeError("simulated onnxsim crash")
    monkeypatch.setattr(onnxsim, "simplify", broken)
    with caplog.at_level("WARNING", logger="vit_deploy"):
        m = export(model="vit-ti16", num_classes=3, img_size=32, out=tmp_path, check=False, quiet=True)
    art = m["artifacts"][0]
    assert not art["simplified"] and "simulated onnxsim crash" in art["simplify_note"]
    assert any("unsimplified" in r.getMessage() for r in caplog.records)
    assert art["verification"]["batch4_max_abs_diff"] < 1e-4


def test_external_data_is_one_file(tmp_path, monkeypatch):
    """Past the 2 GB limit weights go to one model.onnx.data; forced here on a small model."""
    import vit_deploy.onnx_io as io
    monkeypatch.setattr(io, "EXTERNAL_THRESHOLD", 1000)
    m = export(model="vit-ti16", num_classes=3, img_size=32, out=tmp_path, check=False, quiet=True)
    files = sorted(p.name for p in (tmp_path / "vit-ti16").iterdir() if not p.name.startswith("."))
    assert files == ["manifest.json", "model.onnx", "model.onnx.data"]
    art = m["artifacts"][0]
    assert set(art["files"]) == {"model.onnx", "model.onnx.data"} and art["simplified"]
    assert (tmp_path / "vit-ti16" / "model.onnx").stat().st_size < 200_000


class TracerFails(torch.nn.Module):
    """Fails under the TorchScript tracer as timm's EVA-02 does (is_causal as a tensor there)."""
    img_size = 32

    def __init__(self, also_under_export=False):
        super().__init__()
        self.proj, self.also_under_export = torch.nn.Linear(3, 5), also_under_export

    def forward(self, x):
        if torch.jit.is_tracing() or (self.also_under_export and torch.compiler.is_compiling()):
            raise TypeError("argument 'is_causal' must be bool, not Tensor")
        return self.proj(x.mean((2, 3)))


def test_a_model_the_tracer_cannot_run_goes_through_the_dynamo_exporter(tmp_path):
    """timm's EVA-02 passes is_causal as a tensor under the tracer, and export ended in
    scaled_dot_product_attention's TypeError traceback: torch's dynamo exporter runs such a
    model, with the same input and output names and a dynamic batch."""
    from vit_deploy.onnx_export import export_onnx
    model = TracerFails().eval()
    traced = export_onnx(model, tmp_path / "m.onnx", 17, {"model": "timm:fails"})
    assert (traced.exporter, traced.opset) == ("dynamo", 18)
    sess = ort_session(tmp_path / "m.onnx")
    assert [i.name for i in sess.get_inputs()] == ["images"] and sess.get_outputs()[0].name == "logits"
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            want = model(x).numpy()
        assert np.abs(sess.run(None, {"images": x.numpy()})[0] - want).max() < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # weights inside, no parts left


def test_a_model_neither_exporter_can_run_is_one_line(tmp_path, monkeypatch):
    """Both exporters fail: one line naming the model, each error and the model's line."""
    import importlib.util

    from vit_deploy.errors import UserError
    from vit_deploy.onnx_export import export_onnx
    with pytest.raises(UserError) as e:
        export_onnx(TracerFails(also_under_export=True).eval(), tmp_path / "m.onnx", 17, {"model": "timm:fails"})
    said = str(e.value)
    assert said.startswith("timm:fails cannot be traced for ONNX export: TypeError: argument 'is_causal'"), said
    assert "(at tests/test_export.py:" in said and "dynamo exporter failed too" in said and "\n" not in said
    assert not list(tmp_path.iterdir())  # no half-written parts left
    # without onnxscript (torch's dynamo exporter needs it) the line says what to install
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnxscript" else find_spec(n, *a))
    with pytest.raises(UserError, match=r"^timm:fails cannot be traced .*`pip install onnxscript`"):
        export_onnx(TracerFails().eval(), tmp_path / "m.onnx", 17, {"model": "timm:fails"})
    assert not list(tmp_path.iterdir())


def test_bad_opset_and_image_size(tmp_path):
    code, _, err = run_cli("export", "--model", "vit-ti16", "--opset", "12", "--out", tmp_path)
    assert_one_line_error(code, err, "opset 12", "14 to 20")
    code, _, err = run_cli("export", "--model", "vit-b16", "--img-size", "200", "--out", tmp_path)
    assert_one_line_error(code, err, "200", "16")


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, _, err = run_cli("export", "--model", "vit-ti16", "--out", blocker / "sub")
    assert_one_line_error(code, err, "cannot write")


def test_fp16_onnx_keeps_layernorm_in_fp32(tiny_bundle, tmp_path, calib_dir):
    """model.fp16.onnx (for strongly typed TensorRT): FP16 everywhere but LayerNorm, FP32 in and out."""
    from onnx import TensorProto
    from vit_deploy.fp16 import convert_to_fp16
    from vit_deploy.images import list_images, load_images
    from vit_deploy.quantize import cosine
    from vit_deploy.zoo import Preprocessing
    bundle_dir, _ = tiny_bundle
    half = convert_to_fp16(onnx.load(str(bundle_dir / "model.onnx")))
    onnx.checker.check_model(half)
    producers = {o: n for n in half.graph.node for o in n.output}
    inits = {t.name: t for t in half.graph.initializer}
    norms = [n for n in half.graph.node if n.op_type == "LayerNormalization"]
    assert len(norms) == 25
    for n in norms:
        cast = producers[n.input[0]]
        assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.FLOAT
        assert inits[n.input[1]].data_type == TensorProto.FLOAT
    big = [t for t in half.graph.initializer if len(t.dims) == 2]
    assert big and all(t.data_type == TensorProto.FLOAT16 for t in big)
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert half.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    onnx.save(half, str(tmp_path / "h.onnx"))
    x, _ = load_images(list_images(calib_dir)[:8], Preprocessing(img_size=64))
    ref = ort_session(bundle_dir / "model.onnx").run(None, {"images": x})[0]
    got = ort_session(tmp_path / "h.onnx").run(None, {"images": x})[0]
    assert got.dtype == np.float32 and cosine(ref, got).min() > 0.999
