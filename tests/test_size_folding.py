"""Size folding: what only the image size fixes (a DINOv2's resized position grid) becomes a
constant, what depends on the batch stays computed, and the outputs do not move."""
import json
import warnings

import numpy as np
import onnx
import pytest

pytest.importorskip("transformers")

from foreign_graphs import FirstOutput  # noqa: E402


def _ort(path_or_model, x):
    import onnxruntime as ort
    src = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    s = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
    """A Hugging Face Dinov2Model made for 98 px (a 7x7 position grid) and exported at 56 px
    (4x4 patches): the graph resizes its grid from Shape nodes on every run, as the
    published DINOv2s (518 px grids) do at 224. One with a dynamic batch, one also with a
    dynamic height and width."""
    import torch
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("dinov2")
    cfg = Dinov2Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=98,
                       patch_size=14, layerscale_value=0.5)
    tokens = FirstOutput(Dinov2Model(cfg).eval(), "last_hidden_state")
    paths = {}
    for kind, axes in (("batch", {0: "batch"}), ("size", {0: "batch", 2: "h", 3: "w"})):
        paths[kind] = out / f"dinov2-{kind}.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(tokens, (torch.randn(2, 3, 56, 56),), str(paths[kind]), dynamo=False,
                              opset_version=17, input_names=["pixel_values"], output_names=["tokens"],
                              dynamic_axes={"pixel_values": axes, "tokens": {0: "batch"}})
    (out / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "size": {"shortest_edge": 56},
         "crop_size": {"height": 56, "width": 56}, "do_center_crop": True, "resample": 3}))
    return paths


def _ops(m):
    return [n.op_type for n in m.graph.node]


@pytest.mark.parametrize("kind", ["batch", "size"])
def test_the_position_grid_resize_is_folded_and_outputs_stay(dinov2, kind):
    from vit_deploy.size_folding import fold_size_constants
    m = onnx.load(str(dinov2[kind]))
    assert "Resize" in _ops(m)
    folded = onnx.ModelProto()
    folded.CopyFrom(m)
    assert fold_size_constants(folded, 56) >= 1
    assert "Resize" not in _ops(folded)
    dims = folded.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, 56, 56] and not dims[0].HasField("dim_value")  # batch stays dynamic
    # the class token is still expanded to the batch: a value that depends on it is not folded
    assert "Expand" in _ops(folded)
    x = np.random.default_rng(0).standard_normal((3, 3, 56, 56)).astype(np.float32)
    for b in (1, 3):
        assert np.array_equal(_ort(m, x[:b]), _ort(folded, x[:b]))


def test_shapes_read_deep_in_the_model_do_not_stop_the_fold(dinov2, monkeypatch):
    """Each attention reshapes from a Shape of its own input, so evaluating those values takes
    the weights before it; under a weight budget only the embeddings' fit, and the grid
    Resize, which needs no more than them, is still folded."""
    from vit_deploy import onnx_io, size_folding
    m = onnx.load(str(dinov2["batch"]))
    producers = {o: n for n in m.graph.node for o in n.output}
    inits = {t.name: onnx_io.tensor_bytes(t) for t in m.graph.initializer}
    seen, stack = set(), [n.output[0] for n in m.graph.node if n.op_type == "Resize"]
    while stack:  # what the Resize is computed from
        t = stack.pop()
        if t not in seen:
            seen.add(t)
            stack.extend(i for i in (producers[t].input if t in producers else ()) if i)
    monkeypatch.setattr(size_folding, "MAX_CUT_BYTES", sum(inits.get(t, 0) for t in seen) + 1024)
    edge = size_folding.shape_derived(m)
    assert len(size_folding._within_budget(m, edge)) < len(edge)  # the attentions' shapes are over budget
    assert size_folding.fold_size_constants(m, 56) >= 1 and "Resize" not in _ops(m)


def test_a_graph_whose_shapes_depend_on_pixels_is_left_alone():
    """Shape(NonZero(x)) changes with the pixels, not with the image size: never a constant."""
    from onnx import TensorProto, helper

    from vit_deploy.size_folding import fold_size_constants
    nodes = [helper.make_node("NonZero", ["x"], ["nz"]), helper.make_node("Shape", ["nz"], ["s"]),
             helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["sf"], ["n"], keepdims=0), helper.make_node("Mul", ["x", "n"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3, 4, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert fold_size_constants(m, 4) == 0 and "NonZero" in _ops(m)


def test_a_dynamic_size_without_a_size_given_is_left_alone(dinov2):
    from vit_deploy.size_folding import fold_size_constants
    m = onnx.load(str(dinov2["size"]))
    before = m.SerializeToString()
    assert fold_size_constants(m, None) == 0 and m.SerializeToString() == before


def test_quantize_and_the_onnxruntime_fp32_artifact_fold_it(dinov2, calib_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_DEPLOY_CACHE", str(tmp_path / "cache"))
    from vit_deploy import onnx_io
    from vit_deploy.backends.onnxruntime_backend import compile as ort_compile
    from vit_deploy.quantize import quantize
    quantize(dinov2["size"], calib_dir, tmp_path / "q.onnx", calib_size=4)
    q = onnx.load(str(tmp_path / "q.onnx"))
    assert "Resize" not in _ops(q) and onnx_io.get_metadata(q)["quantization"]["size_folded"] >= 1
    _, extras = ort_compile(dinov2["batch"], tmp_path / "fp32.ort.onnx", "fp32", {"img_size": 56})
    assert extras["size_folded"] >= 1 and "Resize" not in _ops(onnx.load(str(tmp_path / "fp32.ort.onnx")))
