"""INT8 Q/DQ: the recipe (what is quantized, symmetric, per channel), fidelity on held-out
photos, calibration data handling and caching, the per-layer report, the fallback."""
import json
import shutil
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import assert_one_line_error, run_cli
from vit_deploy import onnx_io
from vit_deploy.errors import CheckFailed, UserError
from vit_deploy.images import list_images
from vit_deploy.metrics import correlation
from vit_deploy.onnx_export import ort_session
from vit_deploy.pipeline import export
from vit_deploy.quantize import quantize, quantize_weight


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("q")
    export(model="vit-ti16", num_classes=10, img_size=64, out=out, check=False, quiet=True)
    return out / "vit-ti16" / "model.onnx"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_DEPLOY_CACHE", str(tmp_path / "cache"))


def test_recipe_symmetric_per_channel_and_what_stays_float(tiny, calib_dir, tmp_path):
    r = quantize(tiny, calib_dir, tmp_path / "q.onnx", calib_size=8, recipe="smoothquant")
    m = onnx.load(str(tmp_path / "q.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    producers = {o: n for n in m.graph.node for o in n.output}
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = inits[n.input[2]]
            assert zp.dtype == np.int8 and not zp.any(), n.name  # zero point 0: TensorRT's requirement
    # every MatMul with a weight, and the patch Conv, read both inputs through DequantizeLinear ...
    quantized = [n for n in m.graph.node if n.op_type in ("MatMul", "Conv", "Gemm")
                 and all(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in n.input[:2])]
    assert any(n.op_type == "Conv" for n in quantized)
    # 4 weight products per block and the patch Conv, and the 2 attention products per block
    assert len(quantized) == len(r.quantized) == 4 * 12 + 1 + 2 * 12 and r.attention_products == 2 * 12
    # ... with per-channel weight scales
    for n in quantized:
        dq = producers[n.input[1]]
        if dq.input[0] in inits:
            assert inits[dq.input[0]].dtype == np.int8 and inits[dq.input[1]].ndim == 1 and inits[dq.input[1]].size > 1
    # LayerNorm, Softmax, GELU (Erf), residual Adds and the head stay float
    for n in m.graph.node:
        if n.op_type in ("LayerNormalization", "Softmax", "Erf", "Add"):
            assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in n.input), n.name
    assert r.excluded == ["/head/MatMul"] or any("head" in e for e in r.excluded)


def test_small_model_with_weights_in_a_data_file_is_quantized_as_a_small_one(tiny, calib_dir, tmp_path):
    """torch.onnx.export's dynamo exporter (its default since torch 2.9) writes every model's
    weights to a .data file: a 20 MB model so written still gets GPTQ and the recipe choice,
    and the same INT8 file as when its weights are inline."""
    ext = tmp_path / "ext" / "model.onnx"
    ext.parent.mkdir()
    onnx.save_model(onnx.load(str(tiny)), str(ext), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    assert onnx_io.has_external(onnx.load(str(ext), load_external_data=False))
    inline = quantize(tiny, calib_dir, tmp_path / "inline.int8.onnx", calib_size=8)
    spread = quantize(ext, calib_dir, tmp_path / "ext.int8.onnx", calib_size=8)
    assert spread.gptq_weights == inline.gptq_weights > 0
    assert spread.recipe_scores == inline.recipe_scores != {}  # auto weighed the recipes on both
    assert not (tmp_path / "ext.int8.onnx.data").exists()  # small: one file
    a, b = onnx.load(str(tmp_path / "inline.int8.onnx")), onnx.load(str(tmp_path / "ext.int8.onnx"))
    for ta, tb in zip(a.graph.initializer, b.graph.initializer, strict=True):
        assert np.array_equal(numpy_helper.to_array(ta), numpy_helper.to_array(tb)), ta.name


def test_plain_recipe_is_centred_and_tensorrt_valid(tiny, calib_dir, tmp_path):
    r = quantize(tiny, calib_dir, tmp_path / "q.onnx", calib_size=8, recipe="plain")
    assert r.recipe == "plain" and r.attention_products == 0 and not r.recipe_scores
    m = onnx.load(str(tmp_path / "q.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    producers = {o: n for n in m.graph.node for o in n.output}
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert inits[n.input[2]].dtype == np.int8 and not inits[n.input[2]].any(), n.name
    quantized = [n for n in m.graph.node if n.op_type in ("MatMul", "Conv", "Gemm")
                 and all(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in n.input[:2])]
    # the Linears of blocks 1-11: the patch embedding and the first block stay float
    assert len(quantized) == len(r.quantized) == 4 * 11 and not any(n.op_type == "Conv" for n in quantized)
    assert not [n for n in r.quantized if "blocks.0/" in n] and len([n for n in r.excluded if "blocks.0/" in n]) == 6
    # GELU's output is one-sided: fc2 reads it through x - c, and its bias took + c . W_q
    subs = [n for n in m.graph.node if n.op_type == "Sub" and n.output[0] in {p.input[0] for p in m.graph.node
                                                                            if p.op_type == "QuantizeLinear"}]
    assert len(subs) >= 11
    # with every activation Q/DQ bypassed (the centring and the 8-bit weights kept) only weight rounding is
    # left: a wrong shift (c is about half of GELU's range) would cost far more than that
    bypass = onnx.ModelProto()
    bypass.CopyFrom(m)
    for n in bypass.graph.node:
        for i, x in enumerate(n.input):
            dq = producers.get(x)
            if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] not in inits:
                n.input[i] = producers[dq.input[0]].input[0]
    from vit_deploy.images import load_images
    from vit_deploy.zoo import Preprocessing
    x = load_images(list_images(calib_dir)[:4], Preprocessing(img_size=64))[0]
    import onnxruntime as ort
    run = lambda model: ort.InferenceSession(model.SerializeToString(),  # noqa: E731
                                             providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    fp32 = ort_session(tiny).run(None, {"images": x})[0]
    assert correlation(fp32, run(bypass)).min() > 0.999
    # c is a whole number of steps: the CPU runtime form drops each Sub and quantizes x with zero point
    # 128 - k (uint8), its DequantizeLinear keeping 128: the same integers (but for float ties)
    from vit_deploy.backends.ort_int8 import for_onnxruntime
    u8 = onnx.ModelProto()
    u8.CopyFrom(m)
    for_onnxruntime(u8)
    assert not [n for n in u8.graph.node if n.op_type == "Sub" and n.name in {s.name for s in subs}]
    u8_inits = {t.name: numpy_helper.to_array(t) for t in u8.graph.initializer}
    qs = [n for n in u8.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in u8_inits]
    assert {u8_inits[n.input[2]].item() for n in qs} - {128}  # the centred ones moved off 128
    exact = ort.SessionOptions()
    exact.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL

    def integers(model):
        mm = onnx.ModelProto()
        mm.CopyFrom(model)
        mm.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n.output[0]) for n in qs)
        return ort.InferenceSession(mm.SerializeToString(), exact, providers=["CPUExecutionProvider"]).run(
            [n.output[0] for n in qs], {"images": x})
    first = next(i for i, n in enumerate(qs) if u8_inits[n.input[2]].item() != 128)  # before any tie can spread
    a, b = integers(m)[first], integers(u8)[first]
    assert a.dtype == np.int8 and b.dtype == np.uint8
    assert np.mean(a.astype(np.int16) != b.astype(np.int16) - 128) < 1e-4  # a float tie may round either way


def test_auto_recipe_keeps_the_one_closer_to_fp32(tiny, calib_dir, tmp_path, monkeypatch):
    from vit_deploy import quantize as q
    monkeypatch.setattr(q, "GOOD_ENOUGH", 1.1)  # smoothquant is never good enough: both get built and measured
    r = quantize(tiny, calib_dir, tmp_path / "q.onnx", calib_size=8)
    assert set(r.recipe_scores) == {"smoothquant", "plain"}
    best = max(r.recipe_scores, key=lambda k: r.recipe_scores[k]["worst"])
    assert r.recipe == best
    from vit_deploy.onnx_io import get_metadata
    assert get_metadata(onnx.load(str(tmp_path / "q.onnx")))["quantization"]["recipe"] == best


def test_auto_recipe_keeps_a_good_enough_smoothquant_without_building_plain(tiny, calib_dir, tmp_path, monkeypatch):
    from vit_deploy import quantize as q
    monkeypatch.setattr(q, "GOOD_ENOUGH", -1.0)
    monkeypatch.setattr(q, "build_plain", lambda *a, **k: pytest.fail("plain was built"))
    r = quantize(tiny, calib_dir, tmp_path / "q.onnx", calib_size=8)
    assert r.recipe == "smoothquant" and set(r.recipe_scores) == {"smoothquant"}


def test_fidelity_guard_returns_the_blocks_that_gain_most_to_float(tiny, calib_dir, tmp_path):
    """A model whose chosen recipe misses the worst-image line (fc2 inputs 300-1000x on a few
    channels: smoothquant 0.993 on the choice's images): the guard returns whole blocks to
    float until the written file's worst image reaches it, and says so in the file."""
    from vit_deploy.images import load_images, split_for_calibration
    from vit_deploy.layernorm_scaling import inject_mlp_outliers
    from vit_deploy.onnx_io import get_metadata
    from vit_deploy.quantize import GUARD_IMAGES, preprocessing_of
    src = tmp_path / "outliers.onnx"
    onnx.save(inject_mlp_outliers(onnx.load(str(tiny)), low=300, high=1000), str(src))
    off = quantize(src, calib_dir, tmp_path / "off.onnx", calib_size=8, min_correlation=0)
    on = quantize(src, calib_dir, tmp_path / "on.onnx", calib_size=8)
    assert not off.guarded and not off.fidelity
    assert on.guarded and on.fidelity["worst"] >= 0.995
    assert set(on.guarded) <= set(off.quantized) and not set(on.guarded) & set(on.quantized)
    meta = get_metadata(onnx.load(str(tmp_path / "on.onnx")))["quantization"]
    assert meta["fidelity_guard"]["returned_to_float"] == on.guarded and meta["selection_correlation"] == on.fidelity
    # the products said to be in float read no dequantized tensor in the file
    m = onnx.load(str(tmp_path / "on.onnx"))
    dq_out = {o for n in m.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    assert all(not set(n.input) & dq_out for n in m.graph.node if n.name in on.guarded)
    # measured again, outside quantize: the guard's images, both files
    pre, _ = preprocessing_of(onnx.load(str(src)), src)
    _, held = split_for_calibration(list_images(calib_dir), 8)
    x = load_images(held[:GUARD_IMAGES], pre)[0]
    ref = ort_session(src).run(None, {"images": x})[0]
    worst = {k: correlation(ref, ort_session(tmp_path / f"{k}.onnx").run(None, {"images": x})[0]).min()
             for k in ("off", "on")}
    assert worst["off"] < 0.995 <= worst["on"]


def test_fidelity_guard_ranks_groups_then_keeps_the_smallest_product_that_is_enough(monkeypatch):
    """The guard's search on a stand-in model whose error comes from products b (large) and
    d (small): group [d, e] gains most alone, and d alone is enough; the larger b is not
    needed. With nothing that helps, the file stays as it was (None)."""
    from vit_deploy import quantize as q
    rng = np.random.default_rng(0)
    ref = [rng.normal(size=(6, 50))]
    noise = rng.normal(size=(6, 50))

    def fake_run(floated, images):
        return [ref[0] + noise * (0.02 * ("b" not in floated) + 0.2 * ("d" not in floated))]
    monkeypatch.setattr(q, "_run", fake_run)
    variant = lambda extra: (frozenset(extra), {"base"} | extra, 0)  # noqa: E731  (model, excluded, corrected)
    groups = [["a", "b", "c"], ["d", "e"], ["f"]]
    start = q.output_correlation(ref, fake_run(frozenset(), None))
    kept = q.guard_fidelity(variant, groups, ref, np.zeros((6, 1)), start, 0.99, sizes={"d": 10, "e": 1000})
    assert kept[4] == ["d"] and kept[3]["worst"] >= 0.99 and kept[1] == {"base", "d"}
    monkeypatch.setattr(q, "_run", lambda floated, images: [ref[0] + noise])  # float helps nowhere
    assert q.guard_fidelity(variant, groups, ref, np.zeros((6, 1)), start, 0.99) is None


def test_fidelity_is_judged_on_every_output():
    """A second output (masks beside class scores) counts; a one-number output per image has
    no correlation and is left out instead of scoring 0."""
    from vit_deploy.quantize import output_correlation
    rng = np.random.default_rng(0)
    scores, masks, one = rng.normal(size=(4, 10)), rng.normal(size=(4, 3, 8, 8)), rng.normal(size=(4, 1))
    noisy = masks + 0.3 * rng.normal(size=masks.shape)
    both = output_correlation([scores, masks, one], [scores, noisy, one + 0.5])
    alone = output_correlation([masks], [noisy])
    assert both["worst"] == alone["worst"] < 0.99 and both["mean"] > alone["mean"]
    assert output_correlation([one], [one])["worst"] == 1.0


def test_min_correlation_out_of_range_is_one_line(tiny, tmp_path):
    code, out, err = run_cli("quantize", tiny, "--min-correlation", "1.5", "--out", tmp_path / "q.onnx")
    assert_one_line_error(code, err, "--min-correlation")


def _correlated_linear(gain: np.ndarray | None = None, d_in: int = 256, d_out: int = 96):
    """(calibration rows, held-out rows, [in, out] weight) of a Linear whose input channels
    correlate as a ViT's do, each channel times `gain` (outlier channels)."""
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(d_in, d_in)) * np.exp(-np.arange(d_in) / 24)[None, :]  # correlated channels
    gain = np.ones(d_in) if gain is None else gain
    rows = lambda n: ((rng.normal(size=(n, d_in)) @ mix.T) * gain).astype(np.float32)  # noqa: E731
    calib, held = rows(2048), rows(2048)
    return calib, held, (rng.normal(size=(d_in, d_out)) / 16).astype(np.float32)


def _nearest(w: np.ndarray, pair_safe: bool):
    """(int8 steps, scale) of nearest rounding, per output column of a [in, out] weight."""
    from vit_deploy import weight_pairs
    return weight_pairs.quantize_pair_safe(w, 1) if pair_safe else quantize_weight(w, 1, 127)


def test_gptq_rounding_errs_less_than_nearest_on_rows_it_never_saw():
    """GPTQ (weight_rounding.py) against nearest rounding on a Linear whose inputs correlate
    as a ViT's do: the product's error on new rows of the same distribution is smaller, the
    scales and ranges are nearest rounding's, and pair-safe weights stay pair-safe."""
    from vit_deploy import weight_pairs, weight_rounding
    calib, held, w = _correlated_linear()
    u = weight_rounding.inverse_factor(calib.T.astype(np.float64) @ calib)
    for pair_safe in (False, True):
        nearest, scale = _nearest(w, pair_safe)
        top = weight_rounding.tops_of(w, scale, 1)
        q = weight_rounding.round_rows(w, scale, top, u, pair_safe)
        assert q.dtype == np.int8 and (np.abs(q.astype(np.int16)) <= top[None, :]).all()
        assert not pair_safe or weight_pairs.fits(q, 0)
        err = lambda steps: np.linalg.norm(held @ (w - steps.astype(np.float32) * scale))  # noqa: E731
        assert err(q) < 0.8 * err(nearest), (pair_safe, err(q), err(nearest))


def test_gptq_rounds_outlier_channels_first():
    """A trained ViT's outlier input channels: rounded last (in input order), their error has
    no rows left to take it up, and GPTQ then gains little over nearest rounding; in GPTQ's
    activation order (input_order: by falling energy, in pairs) they go first. Held-out
    error < 0.6x the input order's (about 0.35x here), pair-safe weights still pair-safe."""
    from vit_deploy import weight_pairs, weight_rounding
    d_in = 256
    gain = np.ones(d_in)
    gain[-6:] = 30.0  # the outlier channels, last
    calib, held, w = _correlated_linear(gain, d_in)
    h = calib.T.astype(np.float64) @ calib
    order, u = weight_rounding.factor_in_order(h)
    assert set(order[:6]) == set(range(d_in - 6, d_in)) and (order[1::2] == order[::2] + 1).all()
    for pair_safe in (False, True):
        _, scale = _nearest(w, pair_safe)
        top = weight_rounding.tops_of(w, scale, 1)
        as_given = weight_rounding.round_rows(w, scale, top, weight_rounding.inverse_factor(h), pair_safe)
        first = weight_rounding.round_in_order(w, scale, u, order, pair_safe)
        assert (np.abs(first.astype(np.int16)) <= top[None, :]).all()
        assert not pair_safe or weight_pairs.fits(first, 0)
        err = lambda steps: np.linalg.norm(held @ (w - steps.astype(np.float32) * scale))  # noqa: E731
        assert err(first) < 0.6 * err(as_given), (pair_safe, err(first), err(as_given))


def test_gptq_is_the_default_and_the_recipe_is_chosen_before_it(tiny, calib_dir, tmp_path):
    """auto weighs the recipes rounded to nearest (GPTQ fits the calibration images, on which
    the choice may be made), then rounds the chosen one by GPTQ: same choice and scores as
    with nearest rounding, other weights, and the count in the file's metadata."""
    from vit_deploy.onnx_io import get_metadata
    g = quantize(tiny, calib_dir, tmp_path / "g.onnx", calib_size=8)
    n = quantize(tiny, calib_dir, tmp_path / "n.onnx", calib_size=8, weight_rounding="nearest")
    assert g.recipe == n.recipe and g.recipe_scores == n.recipe_scores
    assert g.gptq_weights > 0 and n.gptq_weights == 0
    assert get_metadata(onnx.load(str(tmp_path / "g.onnx")))["quantization"]["gptq_weights"] == g.gptq_weights
    ints = lambda p: {t.name: numpy_helper.to_array(t) for t in onnx.load(str(p)).graph.initializer  # noqa: E731
                      if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2}
    a, b = ints(tmp_path / "g.onnx"), ints(tmp_path / "n.onnx")
    assert a.keys() == b.keys() and sum(not np.array_equal(a[k], b[k]) for k in a) >= g.gptq_weights
    with pytest.raises(UserError, match="weight rounding"):
        quantize(tiny, calib_dir, tmp_path / "x.onnx", calib_size=8, weight_rounding="stochastic")


def test_first_layer_ignores_shape_only_paths_from_the_input(tmp_path):
    """A DINOv2 graph resizes its position grid from Shape(input): that is not pixels."""
    from onnx import TensorProto, helper

    from vit_deploy.quantize import find_targets, first_layer
    rng = np.random.default_rng(0)
    w_conv = numpy_helper.from_array(rng.standard_normal((8, 3, 4, 4)).astype(np.float32), "wc")
    w_fc = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "wf")
    nodes = [helper.make_node("Conv", ["input", "wc"], ["c"], name="patch", strides=[4, 4]),
             helper.make_node("Shape", ["input"], ["shape"], name="shape"),
             helper.make_node("Cast", ["shape"], ["shape_f"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("ReduceSum", ["shape_f"], ["s"], keepdims=0, name="sum"),
             helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1], name="tr"),
             helper.make_node("Mul", ["t", "s"], ["ts"], name="pos"),
             helper.make_node("MatMul", ["ts", "wf"], ["out"], name="fc")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], [w_conv, w_fc])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert [t.node for t in first_layer(m, find_targets(m))] == ["patch"]


def test_fidelity_on_held_out_photos_ort_and_openvino(tiny, calib_dir, tmp_path):
    pytest.importorskip("openvino")
    import openvino as ov
    from vit_deploy.images import load_images
    from vit_deploy.quantize import cosine, preprocessing_of
    r = quantize(tiny, calib_dir, tmp_path / "q.onnx", calib_size=32)
    held = [p for p in list_images(calib_dir) if p.name in set(r.held_out_images)]
    assert len(held) >= 16 and not set(r.held_out_images) & set(r.calibration_images)
    x, _ = load_images(held, preprocessing_of(onnx.load(str(tiny)))[0])
    ref = ort_session(tiny).run(None, {"images": x})[0]
    q_ort = ort_session(tmp_path / "q.onnx").run(None, {"images": x})[0]
    q_ov = ov.Core().compile_model(str(tmp_path / "q.onnx"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({0: x})[0]
    assert cosine(ref, q_ort).min() >= 0.99 and cosine(ref, q_ov).min() >= 0.99


def test_calibration_is_cached(tiny, calib_dir, tmp_path):
    first = quantize(tiny, calib_dir, tmp_path / "a.onnx", calib_size=4)
    second = quantize(tiny, calib_dir, tmp_path / "b.onnx", calib_size=4)
    assert not first.cache_hit and second.cache_hit
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    third = quantize(tiny, calib_dir, tmp_path / "c.onnx", calib_size=5)  # other image list: recomputed
    assert not third.cache_hit


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_methods(tiny, calib_dir, tmp_path, method):
    r = quantize(tiny, calib_dir, tmp_path / "q.onnx", calib_size=4, method=method)
    assert r.method == method and (tmp_path / "q.onnx").is_file()


def test_report_and_exclude(tiny, calib_dir, tmp_path):
    r = quantize(tiny, calib_dir, tmp_path / "q.onnx", calib_size=4, exclude=["*blocks.0/*"], report=True)
    rows = {row["node"]: row for row in r.report}
    assert any("blocks.0/" in n and not row["quantized"] for n, row in rows.items())
    assert all(row["rel_error"] >= 0 for row in rows.values())
    assert any(row["quantized"] and row["rel_error"] > 0 for row in rows.values())
    code, out, err = run_cli("quantize", tiny, "--calib-dir", calib_dir, "--calib-size", "4", "--report",
                             "--out", tmp_path / "r.onnx", env={"VIT_DEPLOY_CACHE": str(tmp_path / "c")})
    assert code == 0, err
    assert "rel err" in out and "MatMul" in out and "wrote" in out


def test_max_drop_unreachable_exits_1(tiny, calib_dir, tmp_path, monkeypatch):
    import vit_deploy.quantize as q
    monkeypatch.setattr(q, "top1_agreement", lambda a, b: 0.5)  # a model no fallback can save
    with pytest.raises(CheckFailed, match="even with every layer in float"):
        quantize(tiny, calib_dir, tmp_path / "q.onnx", calib_size=4, max_drop=0.01)
    assert (tmp_path / "q.onnx").is_file()


def test_max_drop_reachable(tiny, calib_dir, tmp_path):
    r = quantize(tiny, calib_dir, tmp_path / "q.onnx", calib_size=8, max_drop=0.0)
    assert r.agreement == 1.0


def test_foreign_onnx_without_metadata(tmp_path, calib_dir):
    """A timm model exported by someone else: preprocessing comes from the options."""
    timm = pytest.importorskip("timm")
    import torch
    m = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=64).eval()
    torch.onnx.export(m, (torch.randn(1, 3, 64, 64),), str(tmp_path / "timm.onnx"), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}})
    code, out, err = run_cli("quantize", tmp_path / "timm.onnx", "--calib-dir", calib_dir, "--calib-size", "4",
                             "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225",
                             env={"VIT_DEPLOY_CACHE": str(tmp_path / "c")})
    assert code == 0, err
    q = onnx.load(str(tmp_path / "timm.int8.onnx"))
    assert Counter(n.op_type for n in q.graph.node)["QuantizeLinear"] > 10
    meta = {p.key: p.value for p in q.metadata_props}
    assert json.loads(meta["vit_deploy.preprocessing"])["mean"] == [0.485, 0.456, 0.406]


@pytest.mark.parametrize("batch", [1, 2])
def test_foreign_onnx_with_a_fixed_batch(tmp_path, calib_dir, batch):
    """Files from other tools often take exactly one image (exported without a dynamic batch):
    calibration, the recipe choice and GPTQ run them N images at a time, the last run filled
    up (5 images at batch 2), and the INT8 file keeps the fixed batch and answers like FP32."""
    timm = pytest.importorskip("timm")
    import torch
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=64, depth=2).eval()
    torch.onnx.export(m, (torch.randn(batch, 3, 64, 64),), str(tmp_path / "fixed.onnx"), dynamo=False,
                      opset_version=17, input_names=["x"], output_names=["y"])
    r = quantize(tmp_path / "fixed.onnx", calib_dir, tmp_path / "fixed.int8.onnx", calib_size=5, preset="imagenet")
    assert r.gptq_weights > 0 and r.recipe_scores
    q = onnx.load(str(tmp_path / "fixed.int8.onnx"))
    assert q.graph.input[0].type.tensor_type.shape.dim[0].dim_value == batch
    x = np.stack([np.random.default_rng(i).normal(size=(3, 64, 64)).astype(np.float32) for i in range(batch)])
    a = ort_session(tmp_path / "fixed.onnx").run(None, {"x": x})[0]
    b = ort_session(tmp_path / "fixed.int8.onnx").run(None, {"x": x})[0]
    assert correlation(a, b).min() > 0.99
    from vit_deploy.compile import compile_file
    written = compile_file(tmp_path / "fixed.int8.onnx", target="onnxruntime,openvino")
    assert [p.name for p in written] == ["fixed.int8.ort.onnx", "fixed.int8.xml", "fixed.int8.bin"]
    assert correlation(a, ort_session(written[0]).run(None, {"x": x})[0]).min() > 0.99
    import openvino as ov
    compiled = ov.Core().compile_model(str(written[1]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert compiled.inputs[0].get_partial_shape()[0].get_length() == batch  # kept, not made 1..32
    assert correlation(a, compiled(x)[0]).min() > 0.99


@pytest.mark.parametrize("case, said", [("fp16", "weights are float16"), ("uint8-nhwc", "input 'x' is uint8 [batchx64x64x3]"),
                                        ("int8", "already quantized (it has DequantizeLinear, QuantizeLinear nodes)")])
def test_a_file_not_made_of_float32_images_and_weights_is_refused(tmp_path, case, said, tiny):
    """An FP16 export, one that takes uint8 pixels channels-last, or one already quantized
    (that wrote "0 matrix products in INT8" as a success): one line, exit 2."""
    from vit_deploy.fp16 import convert_to_fp16
    m = onnx.load(str(tiny))
    if case == "fp16":
        m = convert_to_fp16(m)
    elif case == "int8":
        from onnxruntime.quantization import QuantType, quantize_static
        from onnxruntime.quantization.calibrate import CalibrationDataReader

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.left = [{m.graph.input[0].name: np.zeros((1, 3, 64, 64), np.float32)}]

            def get_next(self):
                return self.left.pop() if self.left else None
        quantize_static(str(tiny), str(tmp_path / "m.onnx"), Reader(), weight_type=QuantType.QInt8)
        m = onnx.load(str(tmp_path / "m.onnx"))
    else:
        t = m.graph.input[0].type.tensor_type
        t.elem_type = onnx.TensorProto.UINT8
        m.graph.input[0].name = "x"
        for d, v in zip(t.shape.dim[1:], (64, 64, 3)):
            d.dim_value = v
    onnx.save(m, str(tmp_path / "m.onnx"))
    code, _, err = run_cli("quantize", tmp_path / "m.onnx", "--preset", "imagenet", "--calib-size", "2")
    assert_one_line_error(code, err, "m.onnx", said)


def test_quantize_with_target_builds_the_runtime_artifacts_beside(tiny, calib_dir, tmp_path):
    """A foreign file's user has no bundle: `quantize --target` (and `compile FILE.onnx`) write
    each runtime's fastest form beside the INT8 file, and those answer as the file does."""
    pytest.importorskip("openvino")
    out = tmp_path / "m.int8.onnx"
    code, stdout, err = run_cli("quantize", tiny, "--calib-dir", calib_dir, "--calib-size", "4", "--out", out,
                                "--target", "onnxruntime,openvino", env={"VIT_DEPLOY_CACHE": str(tmp_path / "c")})
    assert code == 0, err
    ort_file, xml = tmp_path / "m.int8.ort.onnx", tmp_path / "m.int8.xml"
    assert f"wrote {ort_file}" in stdout and f"wrote {xml}" in stdout and (tmp_path / "m.int8.bin").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert Counter(n.op_type for n in onnx.load(str(ort_file)).graph.node)["MatMulIntegerToFloat"] >= 4 * 11  # plain: block 0 float
    import openvino as ov
    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    ref = ort_session(out).run(None, {"images": x})[0]
    assert correlation(ref, ort_session(ort_file).run(None, {"images": x})[0]).min() > 0.99
    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert correlation(ref, compiled(x)[0]).min() > 0.99
    code, _, err = run_cli("compile", tmp_path / "absent.onnx")
    assert_one_line_error(code, err, "not found", "absent.onnx")
    code, _, err = run_cli("compile", out, "--target", "onnx")
    assert_one_line_error(code, err, "names no runtime")


def test_bad_calibration_input(tiny, tmp_path):
    code, _, err = run_cli("quantize", tiny, "--calib-dir", tmp_path / "missing")
    assert_one_line_error(code, err, "not found", "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    code, _, err = run_cli("quantize", tiny, "--calib-dir", tmp_path / "empty")
    assert_one_line_error(code, err, "holds no image")


def test_corrupt_images_are_skipped_and_listed(tiny, calib_dir, tmp_path, caplog):
    d = tmp_path / "imgs"
    (d / "nested").mkdir(parents=True)
    for p in list(list_images(calib_dir))[:3]:
        shutil.copy(p, d / "nested" / p.name)
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    from PIL import Image
    Image.new("RGBA", (80, 60), (10, 200, 30, 128)).save(d / "rgba.png")
    Image.new("L", (70, 90), 128).save(d / "grey.webp")
    Image.new("P", (50, 50)).save(d / "palette.bmp")
    with caplog.at_level("WARNING", logger="vit_deploy"):
        r = quantize(tiny, d, tmp_path / "q.onnx", calib_size=10)
    assert "broken.jpg" in " ".join(rec.getMessage() for rec in caplog.records)
    assert len(r.calibration_images) == 6 and "broken.jpg" not in r.calibration_images


def test_a_16_bit_grey_png_and_a_tiff_read_as_their_8_bit_photo(calib_dir, tmp_path):
    """Pillow alone clips a 16-bit grey image at 255 (a photo turned nearly white); TIFF files
    count as images."""
    from PIL import Image
    from vit_deploy.images import preprocess
    from vit_deploy.zoo import Preprocessing
    grey = np.asarray(Image.open(list_images(calib_dir)[0]).convert("L"))
    Image.fromarray(grey).save(tmp_path / "grey8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    Image.fromarray(grey).convert("RGB").save(tmp_path / "photo.tif")
    pre = Preprocessing(img_size=64, crop_pct=1.0)
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    assert np.abs(preprocess(tmp_path / "grey16.png", pre) - preprocess(tmp_path / "grey8.png", pre)).max() < 1e-6
    assert np.abs(preprocess(tmp_path / "photo.tif", pre) - preprocess(tmp_path / "grey8.png", pre)).max() < 1e-6
    assert {p.name for p in list_images(tmp_path)} == {"grey8.png", "grey16.png", "photo.tif"}


def test_non_image_model_is_refused(tmp_path, calib_dir):
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])])
    onnx.save(helper.make_model(g), str(tmp_path / "mlp.onnx"))
    code, _, err = run_cli("quantize", tmp_path / "mlp.onnx", "--calib-dir", calib_dir)
    assert_one_line_error(code, err, "4-D image tensor")


def test_asymmetric_scheme_for_cpu_runtimes(tiny, calib_dir, tmp_path):
    """uint8 activations with a zero point: an option for CPU runtimes, never for TensorRT."""
    r = quantize(tiny, calib_dir, tmp_path / "a.onnx", calib_size=8, scheme="asymmetric")
    m = onnx.load(str(tmp_path / "a.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    act_zps = [inits[n.input[2]] for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert act_zps and all(z.dtype == np.uint8 for z in act_zps) and any(z > 0 for z in act_zps)
    weight_zps = [inits[n.input[2]] for n in m.graph.node
                  if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert weight_zps and all(z.dtype == np.int8 and not z.any() for z in weight_zps)
    from vit_deploy.images import load_images
    from vit_deploy.quantize import cosine, preprocessing_of
    held = [p for p in list_images(calib_dir) if p.name in set(r.held_out_images)]
    x, _ = load_images(held, preprocessing_of(onnx.load(str(tiny)))[0])
    ref = ort_session(tiny).run(None, {"images": x})[0]
    got = ort_session(tmp_path / "a.onnx").run(None, {"images": x})[0]
    assert cosine(ref, got).min() > 0.99
    with pytest.raises(UserError, match="unknown scheme"):
        quantize(tiny, calib_dir, tmp_path / "b.onnx", scheme="affine")


def test_model_over_2gb_quantizes_and_compiles(tmp_path, monkeypatch):
    """vit-h14's path (weights in model.onnx.data, no in-memory session possible),
    forced on a small model by lowering the external-data threshold; then run the
    real export pipeline: INT8 ONNX, ONNX Runtime and OpenVINO INT8, and its check."""
    pytest.importorskip("openvino")
    import vit_deploy.onnx_io as io
    monkeypatch.setattr(io, "EXTERNAL_THRESHOLD", 1000)
    m = export(model="vit-ti16", num_classes=10, img_size=64, target="onnxruntime,openvino", precision="int8",
               out=tmp_path, quiet=True)
    by = {(a["backend"], a["precision"]): a for a in m["artifacts"]}
    assert set(by[("onnx", "fp32")]["files"]) == {"model.onnx", "model.onnx.data"}
    assert set(by[("onnx", "int8")]["files"]) == {"model.int8.onnx", "model.int8.onnx.data"}
    assert ("onnxruntime", "int8") in by and ("openvino", "int8") in by
    results = m["parity"]["results"]
    assert {"onnxruntime-int8", "openvino-int8"} <= set(results)
    for name, r in results.items():
        assert r["passed"] and r["min_cosine"] >= 0.99, (name, r)


def test_weights_on_disk_give_the_same_int8_model(tiny, calib_dir, tmp_path, monkeypatch):
    """A model with external weights is quantized one tensor at a time from its data file
    (onnx_io.load_lazy / spill_weights, vit-h14's memory); the result must be the very
    model the in-memory path makes, and the scratch folder must be gone afterwards."""
    import tempfile

    import vit_deploy.onnx_io as io
    monkeypatch.setattr(io, "SPILL_BYTES", 1024)  # spill every new weight of the tiny model
    monkeypatch.setattr(io, "EXTERNAL_THRESHOLD", 1 << 20)  # and take it for one over protobuf's limit
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    ext = tmp_path / "ext" / "model.onnx"
    ext.parent.mkdir()
    assert io.save(io.load(tiny), ext, external=True) == ["model.onnx", "model.onnx.data"]
    # auto recipe and GPTQ: in-memory models only
    quantize(tiny, calib_dir, tmp_path / "inline.int8.onnx", calib_size=8, recipe="smoothquant",
             weight_rounding="nearest")
    assert quantize(ext, calib_dir, tmp_path / "ext.int8.onnx", calib_size=8, recipe="smoothquant").gptq_weights == 0
    a, b = (onnx.load(str(tmp_path / f"{k}.int8.onnx")) for k in ("inline", "ext"))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    wa = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    wb = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert wa.keys() == wb.keys()
    for name, value in wa.items():
        np.testing.assert_array_equal(value, wb[name], err_msg=name)
    assert not list((tmp_path / "tmp").iterdir())  # scratch weights and temporary models removed


def test_lazy_model_refuses_data_outside_its_folder(tiny, tmp_path):
    """A foreign model whose external data points out of its folder is refused, not read."""
    import vit_deploy.onnx_io as io
    (tmp_path / "a").mkdir()
    io.save(io.load(tiny), tmp_path / "a" / "model.onnx", external=True)
    light = onnx.load(str(tmp_path / "a" / "model.onnx"), load_external_data=False)
    for t in light.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../model.onnx.data"
    (tmp_path / "b").mkdir()
    onnx.save(light, str(tmp_path / "b" / "model.onnx"))
    shutil.copy(tmp_path / "a" / "model.onnx.data", tmp_path / "model.onnx.data")
    with pytest.raises(ValueError, match="outside"):
        io.load_lazy(tmp_path / "b" / "model.onnx")
    with pytest.raises(UserError, match="not a readable ONNX model"):
        quantize(tmp_path / "b" / "model.onnx", tmp_path, tmp_path / "q.onnx", preset="imagenet")


def _saturated_pairs(u8: np.ndarray, w: np.ndarray) -> int:
    """VPMADDUBSW (x86 without VNNI): u8 x s8 products added in pairs into a saturating int16.
    Counts the pairs that would saturate, for activations u8 [n, k] and weights w [m, k]."""
    p = u8[:, None, :].astype(np.int32) * w[None, :, :].astype(np.int32)
    pairs = p[..., 0::2] + p[..., 1::2]
    return int(((pairs > 32767) | (pairs < -32768)).sum())


@pytest.mark.parametrize("fix", ["off", "first-layer", "all"])
def test_overflow_fix_keeps_int16_pairs_from_saturating(tiny, calib_dir, tmp_path, fix):
    """The layer that reads the image saturates a non-VNNI CPU's int16 pairs with full-range
    weights (OpenVINO INT8 vit-b16 fell to cosine 0.924 on an AVX2-only CPU); 7-bit weights
    cannot. Emulated here on real photos, so it is checked on every machine."""
    from vit_deploy import weight_pairs
    from vit_deploy.images import load_images
    from vit_deploy.quantize import preprocessing_of
    r = quantize(tiny, calib_dir, tmp_path / "q.onnx", calib_size=8, overflow_fix=fix, recipe="smoothquant")  # its patch conv is in INT8
    m = onnx.load(str(tmp_path / "q.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    weights = {k[:-len("_int8")]: v for k, v in inits.items() if k.endswith("_int8")}
    tops = {k: int(np.abs(v).max()) for k, v in weights.items()}
    patch = next(k for k in weights if "patch_embed" in k)
    weight_products = len(r.quantized) - r.attention_products
    assert weight_products > 1 and len(r.seven_bit_weights) == {"off": 0, "first-layer": 1, "all": 1}[fix]
    assert tops[patch] == (127 if fix == "off" else 63)
    linears = {k: v for k, v in weights.items() if k != patch}
    if fix == "all":  # 8-bit steps, no same-sign pair of input rows over 128 (weight_pairs.py)
        assert all(weight_pairs.fits(v, 0) for v in linears.values()) and max(tops[k] for k in linears) > 63
    else:
        assert all(tops[k] == 127 for k in linears)
    # The patch Conv on real photos: symmetric int8 activations shifted to uint8, as the CPU does.
    x, _ = load_images(list_images(calib_dir)[:4], preprocessing_of(m)[0])
    scale = float(inits["images_scale"])
    s8 = np.clip(np.round(x / scale), -127, 127)
    p = 16
    cols = s8.reshape(4, 3, 4, p, 4, p).transpose(0, 2, 4, 1, 3, 5).reshape(-1, 3 * p * p)  # im2col
    w = weights[patch].reshape(weights[patch].shape[0], -1)
    saturated = _saturated_pairs((cols + 128).astype(np.uint8), w)
    assert (saturated > 0) if fix == "off" else (saturated == 0), saturated


def test_overflow_fix_auto_follows_the_runtimes(tmp_path):
    from vit_deploy.quantize import resolve_overflow_fix
    assert resolve_overflow_fix("auto", ["tensorrt"]) == "off"  # GPUs do not saturate: full 8-bit weights
    assert resolve_overflow_fix("auto", ["tensorrt", "openvino"]) == "all"  # one Q/DQ model serves both
    assert resolve_overflow_fix("auto", ()) == "all"  # unknown runtime: safe for every CPU
    assert resolve_overflow_fix("first-layer", ["tensorrt"]) == "first-layer"
    code, _, err = run_cli("export", "--model", "vit-ti16", "--precision", "int8", "--overflow-fix", "most",
                           "--out", tmp_path)
    assert_one_line_error(code, err, "overflow-fix", "most")
