"""Model sources beyond the built-in zoo (issue 12): `timm:NAME`, Hugging Face model directories,
and headless models whose output is the pooled embedding.

Each model goes once through the whole pipeline (export at a small size, verified at batches
1 and 4, simplified, INT8 for ONNX Runtime and OpenVINO, checked on the shipped photos); the
tests below share those bundles. Random weights throughout; nothing is downloaded.
"""
import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from vit_deploy.errors import UserError

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

from vit_deploy.pipeline import SEED, export  # noqa: E402
from vit_deploy.sources import resolve  # noqa: E402

TOL = 1e-4
INT8_MIN_COSINE = 0.99


def _hf_dir(root, name, model_cls, config, crop, resize):
    """A Hugging Face model directory as save_pretrained writes it, plus a DeiT/DINOv2-style
    preprocessor_config.json (resize the short side, centre-crop)."""
    d = root / name
    d.mkdir()
    config.architectures = [model_cls.__name__]
    config.save_pretrained(d)  # no weights file: random weights, drawn from the pipeline's seed
    (d / "preprocessor_config.json").write_text(json.dumps({
        "do_center_crop": True, "crop_size": {"height": crop, "width": crop}, "size": {"shortest_edge": resize},
        "resample": 3, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    return d


def _timm_reference(name, img_size, args, pooled=False):
    def build(_dir):
        torch.manual_seed(SEED)
        m = timm.create_model(name, pretrained=False, img_size=img_size, **args).eval()
        if pooled:  # what the issue asks of an embedding: after the final norm and pooling
            return lambda x: m.forward_head(m.forward_features(x), pre_logits=True)
        return m
    return build


def _hf_reference(model_cls, pick):
    def build(d):
        torch.manual_seed(SEED)
        m = model_cls(transformers.AutoConfig.from_pretrained(d)).eval()
        return lambda x: pick(m(pixel_values=x))
    return build


SMALL_HF = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)

# id: (model, img_size, timm constructor args, output, reference builder, HF directory maker)
CASES = {
    "deit-distilled": ("timm:deit_small_distilled_patch16_224", 64, {"depth": 2}, "logits",
                       _timm_reference("deit_small_distilled_patch16_224", 64, {"depth": 2}), None),
    "dinov2-reg4": ("timm:vit_small_patch14_reg4_dinov2", 56, {"depth": 2}, "embedding",
                    _timm_reference("vit_small_patch14_reg4_dinov2", 56, {"depth": 2}), None),
    "swin-tiny": ("timm:swin_tiny_patch4_window7_224", 64, {"window_size": 2, "depths": [1, 1, 1, 1]}, "logits",
                  _timm_reference("swin_tiny_patch4_window7_224", 64, {"window_size": 2, "depths": [1, 1, 1, 1]}),
                  None),
    # the TorchScript tracer cannot run EVA-02 (is_causal as a tensor): torch's dynamo exporter does
    "eva02": ("timm:eva02_tiny_patch14_224", 56, {"depth": 2}, "embedding",  # timm builds it headless
              _timm_reference("eva02_tiny_patch14_224", 56, {"depth": 2}, pooled=True), None),
    "mobilevit-s": ("timm:mobilevit_s", 64, {}, "logits", _timm_reference("mobilevit_s", 64, {}), None),
    # timm builds the R50 hybrid headless by default (its published weights have no head)
    "r50-headless": ("timm:vit_base_r50_s16_224", 64, {"depth": 2}, "embedding",
                     _timm_reference("vit_base_r50_s16_224", 64, {"depth": 2}, pooled=True), None),
    "hf-deit-teacher": ("hf", None, {}, "logits",
                        _hf_reference(transformers.DeiTForImageClassificationWithTeacher, lambda o: o.logits),
                        lambda root: _hf_dir(root, "deit", transformers.DeiTForImageClassificationWithTeacher,
                                             transformers.DeiTConfig(**SMALL_HF, intermediate_size=128, image_size=64,
                                                                     patch_size=16, num_labels=10), 64, 73)),
    "hf-dinov2": ("hf", None, {}, "embedding", _hf_reference(transformers.Dinov2Model, lambda o: o.pooler_output),
                  lambda root: _hf_dir(root, "dinov2", transformers.Dinov2Model,
                                       transformers.Dinov2Config(**SMALL_HF, mlp_ratio=2, image_size=70,
                                                                 patch_size=14), 56, 64)),
    # transformers' DINOv2 with registers: the TorchScript exporter has no antialiased bicubic resize
    "hf-dinov2-reg": ("hf", None, {}, "embedding", _hf_reference(transformers.Dinov2WithRegistersModel,
                                                                lambda o: o.pooler_output),
                      lambda root: _hf_dir(root, "dinov2reg", transformers.Dinov2WithRegistersModel,
                                           transformers.Dinov2WithRegistersConfig(**SMALL_HF, mlp_ratio=2,
                                                                                  image_size=70, patch_size=14,
                                                                                  num_register_tokens=4), 56, 64)),
    "hf-dinov2-cls": ("hf", None, {}, "logits",
                      _hf_reference(transformers.Dinov2ForImageClassification, lambda o: o.logits),
                      lambda root: _hf_dir(root, "dinov2cls", transformers.Dinov2ForImageClassification,
                                           transformers.Dinov2Config(**SMALL_HF, mlp_ratio=2, image_size=70,
                                                                     patch_size=14, num_labels=5), 56, 64)),
}


_BUILT = {}


def _bundle(case_id, tmp_path_factory):
    """One model through export (FP32 ONNX, INT8 for ONNX Runtime and OpenVINO, check): once per model."""
    if case_id not in _BUILT:
        model, img_size, args, output, reference, make_dir = CASES[case_id]
        root = tmp_path_factory.mktemp(case_id)
        hf_dir = make_dir(root) if make_dir else None
        model = f"hf:{hf_dir}" if hf_dir else model
        manifest = export(model=model, img_size=img_size, model_args=args, target="onnxruntime,openvino",
                          precision="int8", out=root / "out", quiet=True)
        _BUILT[case_id] = {"id": case_id, "bundle": root / "out" / resolve(model).bundle_name,
                           "manifest": manifest, "output": output, "reference": reference(hf_dir)}
    return _BUILT[case_id]


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    return _bundle(request.param, tmp_path_factory)


def test_onnx_fp32_equals_the_source_library_at_batch_1_and_4(case):
    import onnxruntime as ort
    m = case["manifest"]
    assert m["model"]["output"] == case["output"]
    assert (m["model"]["num_classes"] == 0) == (case["output"] == "embedding")
    sess = ort.InferenceSession(str(case["bundle"] / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_outputs()[0].name == case["output"]
    size = m["model"]["img_size"]
    for batch in (1, 4):
        x = np.random.default_rng(batch).standard_normal((batch, 3, size, size)).astype(np.float32)
        with torch.no_grad():
            want = case["reference"](torch.from_numpy(x)).numpy()
        got = sess.run(None, {"images": x})[0]
        assert got.shape == want.shape == (batch, m["model"]["output_dim"])
        diff = float(np.abs(got - want).max())
        print(f"{case['id']}: ONNX Runtime FP32 vs eager, batch {batch}: max abs {diff:.2e}")
        assert diff <= TOL, diff


def test_int8_on_both_runtimes_and_the_check_pass(case):
    parity = case["manifest"]["parity"]
    results = parity["results"]
    for name in ("onnxruntime-int8", "openvino-int8"):
        print(f"{case['id']}: {name} min cosine {results[name]['min_cosine']:.5f} on {parity['images']} photos")
        assert results[name]["min_cosine"] >= INT8_MIN_COSINE, (name, results[name])
    assert parity["passed"], results
    assert parity["images"] >= 8  # the held-out shipped photos


@pytest.mark.parametrize("case_id", ["deit-distilled", "swin-tiny", "hf-deit-teacher"])
def test_check_rebuilds_the_reference_from_the_manifest(case_id, tmp_path_factory):
    """`check` later rebuilds the model from the manifest alone (source kind, timm options such
    as a list of depths, seed; the HF directory): the rebuilt reference must give the exported
    model's outputs. (The embedding case is the command-line check below.)"""
    from vit_deploy.parity import check
    case = _bundle(case_id, tmp_path_factory)
    report = check(case["bundle"], backends=["onnx"], max_images=4, record=False)
    assert report["passed"], report["results"]
    fp32 = next(r for r in report["results"] if r["precision"] == "fp32")
    assert fp32["metrics"]["max_abs"] < 1e-3


def test_the_exporter_used_is_in_the_manifest(tmp_path_factory):
    """EVA-02 and transformers' DINOv2 with registers went through torch's dynamo exporter
    (opset 18), the others through the tracer."""
    onnx_entry = {k: next(a for a in _bundle(k, tmp_path_factory)["manifest"]["artifacts"] if a["backend"] == "onnx"
                          and a["precision"] == "fp32") for k in ("eva02", "hf-dinov2-reg", "deit-distilled")}
    for k in ("eva02", "hf-dinov2-reg"):
        assert (onnx_entry[k]["exporter"], onnx_entry[k]["opset"]) == ("dynamo", 18), k
    assert (onnx_entry["deit-distilled"]["exporter"], onnx_entry["deit-distilled"]["opset"]) == ("torchscript", 17)


def test_preprocessing_comes_from_the_source():
    """timm's pretrained config and transformers' preprocessor_config.json, not the zoo's defaults."""
    from vit_deploy.weights import hf_preprocessing
    pre = hf_preprocessing({"do_center_crop": True, "crop_size": {"height": 224, "width": 224},
                            "size": {"shortest_edge": 256}, "resample": 3, "image_mean": [0.1, 0.2, 0.3],
                            "image_std": [0.4, 0.5, 0.6], "do_normalize": True})
    assert pre == {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "interpolation": "bicubic",
                   "crop_pct": 224 / 256, "img_size": 224}
    vit = hf_preprocessing({"size": {"height": 384, "width": 384}, "resample": 2, "image_mean": [0.5] * 3,
                            "image_std": [0.5] * 3})
    assert vit["crop_pct"] == 1.0 and vit["img_size"] == 384 and vit["interpolation"] == "bilinear"


def test_timm_preprocessing_in_the_manifest(tmp_path):
    source = resolve("timm:deit_tiny_patch16_224")
    torch.manual_seed(0)
    built = source.build(None, 32, None, {"depth": 1})
    pre = built.module.preprocessing
    assert (pre.img_size, pre.crop_pct, pre.interpolation) == (32, 0.9, "bicubic")
    assert pre.mean == (0.485, 0.456, 0.406)  # DeiT: ImageNet statistics, not the ViT 0.5s
    assert built.source == {"kind": "timm", "name": "deit_tiny_patch16_224", "options": {"depth": 1},
                            "timm_version": timm.__version__, "weights": None}


# ------------------------------------------------------------------ weights


def test_timm_weights_file_headless_by_default_and_head_misfit(tmp_path):
    """A timm state dict in .safetensors: its head (or none) decides the output; a class count
    it cannot give is one error naming both shapes."""
    from safetensors.torch import save_file
    torch.manual_seed(123)  # not the pipeline's seed: the output must come from the file
    ref = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, num_classes=7).eval()
    save_file(ref.state_dict(), tmp_path / "w.safetensors")
    source = resolve("timm:deit_tiny_patch16_224")
    built = source.build(None, 32, tmp_path / "w.safetensors", {"depth": 1})
    assert built.model["num_classes"] == 7 and built.source["weights"]["layout"] == "timm"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(built.module(x), ref(x), atol=TOL, rtol=0)
        emb = source.build(0, 32, tmp_path / "w.safetensors", {"depth": 1})
        assert emb.model["output"] == "embedding"
        torch.testing.assert_close(emb.module(x), ref.forward_head(ref.forward_features(x), pre_logits=True),
                                   atol=TOL, rtol=0)
    with pytest.raises(UserError, match=r"\[7, 192\].*3 classes need \[3, 192\]"):
        source.build(3, 32, tmp_path / "w.safetensors", {"depth": 1})
    headless = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, num_classes=0)
    save_file(headless.state_dict(), tmp_path / "headless.safetensors")
    assert source.build(None, 32, tmp_path / "headless.safetensors", {"depth": 1}).model["output"] == "embedding"
    with pytest.raises(UserError, match="no head"):
        source.build(5, 32, tmp_path / "headless.safetensors", {"depth": 1})


def test_timm_hub_weights_offline_say_so(tmp_path):
    with pytest.raises(UserError, match="offline"):
        resolve("timm:deit_tiny_patch16_224").build(None, 32, "pretrained", {"depth": 1})


def test_hf_directory_with_weights_and_its_embedding(tmp_path):
    """A classifier directory with weights loads through transformers; --num-classes 0 gives its
    backbone's pooled output; another class count names both."""
    torch.manual_seed(123)
    cfg = transformers.Dinov2Config(**SMALL_HF, mlp_ratio=2, image_size=28, patch_size=14, num_labels=3,
                                    id2label={0: "cat", 1: "dog", 2: "eel"}, label2id={"cat": 0, "dog": 1, "eel": 2})
    ref = transformers.Dinov2ForImageClassification(cfg).eval()
    ref.save_pretrained(tmp_path)
    source = resolve(str(tmp_path))  # any directory with a config.json
    built = source.build(None, None, None, {})
    assert built.model["labels"] == ["cat", "dog", "eel"] and built.source["weights"]["layout"] == "transformers"
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(built.module(x), ref(pixel_values=x).logits, atol=TOL, rtol=0)
        emb = source.build(0, None, None, {})
        torch.testing.assert_close(emb.module(x), ref.dinov2(pixel_values=x).pooler_output, atol=TOL, rtol=0)
    with pytest.raises(UserError, match="3-class head.*--num-classes 10"):
        source.build(10, None, None, {})


# ------------------------------------------------------------------ bad input


def test_unknown_timm_name_offers_close_names():
    with pytest.raises(UserError, match=r"unknown timm model .*did you mean timm:deit_small_distilled_patch16_224"):
        resolve("timm:deit_small_distiled_patch16_224")


def test_timm_missing_names_the_extra(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(UserError, match=r"vit-deploy\[timm\]"):
        resolve("timm:deit_small_patch16_224")


def test_hf_directory_of_a_text_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    with pytest.raises(UserError, match="BertForMaskedLM.*not an image"):
        resolve(f"hf:{tmp_path}")


def test_data_dependent_control_flow_names_the_op_and_model(tmp_path):
    """A traced graph keeps one branch of Python control flow on tensor values: the export ends
    with one error naming where (not a wrong model, not a traceback)."""
    from vit_deploy.onnx_export import export_onnx, verify_onnx

    class Loopy(torch.nn.Module):
        img_size, output = 16, "logits"

        def forward(self, x):
            y = x.mean((2, 3))
            for _ in range(int(x.abs().max() * 4)):  # the loop count depends on the pixels
                y = y * 1.5
            return y

    model = Loopy().eval()
    traced = export_onnx(model, tmp_path / "m.onnx", metadata={"model": "loopy"})
    with pytest.raises(UserError, match=r"loopy: export needs data-dependent control flow.*int\(x\.abs\(\)\.max"):
        verify_onnx(tmp_path / "m.onnx", model, trace_warnings=traced.warnings, model_name="loopy")


# ------------------------------------------------------------------ embedding bundle commands


@pytest.fixture(scope="module")
def embedding_bundle(tmp_path_factory):
    """An embedding bundle made above (the Hugging Face Dinov2Model), for the other commands."""
    return _bundle("hf-dinov2", tmp_path_factory)["bundle"]


def test_embedding_bundle_check_and_info_on_the_command_line(embedding_bundle):
    d = embedding_bundle
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["model"]["output"] == "embedding" and manifest["model"]["num_classes"] == 0
    assert manifest["model"]["output_dim"] == 64
    code, out, err = run_cli("check", d, "--max-images", "8")
    assert code == 0, err
    assert "n/a" in out and "embedding model" in out
    code, out, err = run_cli("info", d)
    assert code == 0 and "embedding [64]" in out and "top-1 agreement n/a" in out, out + err


def test_embedding_bundle_predict_writes_npy(embedding_bundle, tmp_path):
    from vit_deploy.images import default_calibration_dir, list_images
    photos = list_images(default_calibration_dir())[:3]
    code, out, err = run_cli("predict", embedding_bundle, *photos, "--out", tmp_path / "e.npy")
    assert code == 0, err
    emb = np.load(tmp_path / "e.npy")
    assert emb.shape == (3, 64)
    assert out.count("embedding [64], L2 norm") == 3
    assert f"{np.linalg.norm(emb[0]):.4f}" in out


def test_embedding_bundle_bench(embedding_bundle):
    from vit_deploy.bench import bench
    report = bench(embedding_bundle, batches=(1,), iters=2, warmup=1, record=False)
    assert {r["artifact"] for r in report["results"]} >= {"torch-fp32", "onnx-fp32", "openvino-int8"}


def test_reference_rebuild_refuses_other_weights_before_building(tmp_path):
    """check --weights with another file: the recorded sha256 is compared before anything is built,
    so a file of another shape still gets the sha256 message, not a shape mismatch."""
    from vit_deploy import build_model, save_weights
    from vit_deploy.sources import build_reference
    save_weights(build_model("vit-ti16", num_classes=3, img_size=32), tmp_path / "a.safetensors")
    save_weights(build_model("vit-s16", num_classes=5, img_size=32), tmp_path / "other.safetensors")
    torch.manual_seed(SEED)
    built = resolve("vit-ti16").build(None, None, tmp_path / "a.safetensors", {})
    manifest = {"model": built.model, "source": {**built.source, "seed": SEED}}
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(build_reference(manifest)(x), built.module(x))
    with pytest.raises(UserError, match="sha256 differs"):
        build_reference(manifest, tmp_path / "other.safetensors")
