"""INT8 across the rest of the ViT family: does `quantize` hold, and does every quantized
product run as an INT8 kernel, on architectures beyond the graphs of issue 11?

For each model (random weights, small configs; timm and Hugging Face transformers), the
graph is exported as users export it, given both outlier stand-ins where it has their
patterns (vit_deploy/layernorm_scaling: LayerNorm channels 20-100x, massive fc2-input
channels; a new FP32 model, the reference), quantized with the defaults
(preprocessor_config.json beside it), and compiled for ONNX Runtime and OpenVINO by
vit-deploy itself. Reported per model: the recipe kept, products quantized / kept in
float (the head, a CNN backbone, what the fidelity guard returned), min cosine and mean
correlation against FP32 on the held-out shipped photos on both runtimes, ONNX Runtime's
INT8 kernels (MatMulIntegerToFloat) against the quantized Linears, float products
that still read a dequantized weight (should be 0), and OpenVINO's layers running in
i8/u8, and whether the file keeps TensorRT's Q/DQ rules (signed int8, zero point 0,
weights per output channel). Fidelity only: no timing (see int8_peers.py for speed).

    python benchmarks/family_int8.py                       # every model
    python benchmarks/family_int8.py --models timm-swin,timm-levit

Needs `pip install timm transformers onnxscript` (the dynamo exporter for EVA-02 and
DINOv2 with registers). Writes benchmarks/out/family_int8.md.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import logging
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

SMALL = dict(depth=2, embed_dim=192, num_heads=3)
TEXT = dict(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=768)


def _timm(name, size, **kw):
    import timm
    return timm.create_model(name, pretrained=False, num_classes=100, img_size=size, **kw).eval()


def _hf(cls_name, cfg_name, attr, **cfg):
    import transformers
    from foreign_graphs import FirstOutput
    config = getattr(transformers, cfg_name)(**cfg)
    return FirstOutput(getattr(transformers, cls_name)(config).eval(), attr)


# name: (builder, image size, needs the dynamo exporter)
MODELS = {
    "timm-swin": (lambda s: _timm("swin_tiny_patch4_window7_224", s, embed_dim=48, depths=(1, 1, 2, 1),
                                  num_heads=(2, 2, 4, 4)), 224, False),
    "timm-beit": (lambda s: _timm("beit_base_patch16_224", s, **SMALL), 64, False),
    "timm-deit3": (lambda s: _timm("deit3_small_patch16_224", s, **SMALL), 64, False),
    "timm-clip-quickgelu": (lambda s: _timm("vit_base_patch16_clip_quickgelu_224", s, **SMALL), 64, False),
    "timm-eva02": (lambda s: _timm("eva02_tiny_patch14_224", s, depth=2), 56, True),
    "timm-levit": (lambda s: _timm("levit_128s", s), 224, False),
    "timm-mobilevit": (lambda s: _timm("mobilevit_xxs", s), 256, False),
    "timm-efficientformer": (lambda s: _timm("efficientformer_l1", s), 224, False),
    "timm-r26-vit-s": (lambda s: _timm("vit_small_r26_s32_224", s, depth=2), 64, False),
    "timm-r50-vit-b": (lambda s: _timm("vit_base_r50_s16_224", s, depth=2, embed_dim=192, num_heads=3), 224, False),
    "hf-clip": (lambda s: _hf("CLIPVisionModel", "CLIPVisionConfig", "pooler_output", image_size=s, patch_size=16,
                              **TEXT), 64, False),
    "hf-swin": (lambda s: _hf("SwinModel", "SwinConfig", "pooler_output", image_size=s, embed_dim=48,
                              depths=[1, 1, 2, 1], num_heads=[2, 2, 4, 4], window_size=7), 224, False),
    "hf-siglip": (lambda s: _hf("SiglipVisionModel", "SiglipVisionConfig", "pooler_output", image_size=s,
                                patch_size=16, **TEXT), 64, False),
    "hf-deit": (lambda s: _hf("DeiTForImageClassificationWithTeacher", "DeiTConfig", "logits", image_size=s,
                              patch_size=16, num_labels=100, **TEXT), 64, False),
    "hf-beit": (lambda s: _hf("BeitForImageClassification", "BeitConfig", "logits", image_size=s, patch_size=16,
                              num_labels=100, use_relative_position_bias=True, **TEXT), 64, False),
    "hf-dinov2-reg": (lambda s: _hf("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", "pooler_output",
                                    image_size=s, patch_size=14, num_register_tokens=4, layerscale_value=0.5,
                                    mlp_ratio=4, hidden_size=192, num_hidden_layers=2, num_attention_heads=3),
                      56, True),
}


def _export(kind: str, out: Path) -> Path:
    import onnx
    import torch
    from foreign_graphs import IMAGENET, torch_export
    from vit_deploy.layernorm_scaling import inject_mlp_outliers, inject_outliers
    torch.manual_seed(0)
    build, size, dynamo = MODELS[kind]
    src = out / f"{kind}.onnx"
    torch_export(build(size), src, size, 17, "pixel_values", dynamo=dynamo)
    (out / "preprocessor_config.json").write_text(json.dumps({**IMAGENET, "size": {"shortest_edge": size},
                                                              "crop_size": {"height": size, "width": size},
                                                              "do_center_crop": True, "resample": 3}))
    fp32 = out / f"{kind}.outliers.onnx"
    from vit_deploy import onnx_io
    onnx_io.save(inject_outliers(inject_mlp_outliers(onnx.load(str(src)))), fp32)
    return fp32


def _ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def _ort_kernels(path: Path, tmp: Path) -> tuple[int, int]:
    """(INT8 kernels, float products reading a dequantized weight) in ONNX Runtime's optimized model."""
    import onnx
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp / "opt.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    m = onnx.load(str(tmp / "opt.onnx"))
    inits = {t.name for t in m.graph.initializer}
    producers = {o: n for n in m.graph.node for o in n.output}
    float_fed = sum(1 for n in m.graph.node if n.op_type in ("MatMul", "Gemm", "FusedMatMul", "FusedGemm")
                    and any(i in producers and producers[i].op_type == "DequantizeLinear"
                            and producers[i].input[0] in inits for i in n.input))
    return sum(n.op_type == "MatMulIntegerToFloat" for n in m.graph.node), float_fed


def tensorrt_valid(m) -> bool:
    """The one file's TensorRT constraints: signed int8 with zero point 0 on every Q/DQ,
    weights per output channel within +-127 (as tests/test_int8_graphs.py checks)."""
    from onnx import numpy_helper
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp = inits.get(n.input[2]) if len(n.input) > 2 else None
        if zp is None or zp.dtype != np.int8 or zp.any():
            return False
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            w, scale = inits[n.input[0]], inits[n.input[1]]
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            if w.dtype != np.int8 or w.min() < -127 or scale.size != w.shape[axis]:
                return False
    return True


def measure(kind: str, tmp: Path) -> dict:
    import onnx
    from vit_deploy.backends import openvino_backend as ovb
    from vit_deploy.backends.onnxruntime_backend import compile as ort_compile
    from vit_deploy.images import default_calibration_dir, list_images, load_images, split_for_calibration
    from vit_deploy.metrics import correlation
    from vit_deploy.quantize import cosine, find_targets, preprocessing_of, quantize
    t0 = time.time()
    fp32 = _export(kind, tmp)
    calib = default_calibration_dir()
    int8 = tmp / f"{kind}.int8.onnx"
    r = quantize(fp32, calib, int8, calib_size=16)
    pre, _ = preprocessing_of(onnx.load(str(int8)), int8)
    x = load_images(split_for_calibration(list_images(calib), 16)[1][:16], pre)[0]
    ref = _ort_run(fp32, x)
    ort_compile(int8, tmp / "m.ort.onnx", "int8", {})
    got_ort = _ort_run(tmp / "m.ort.onnx", x)
    kernels, float_fed = _ort_kernels(tmp / "m.ort.onnx", tmp)
    ovb.compile(int8, tmp / "m.xml", "int8", {"max_batch": 8})
    # the form vit-deploy's own runner loads on this CPU (without VNNI: openvino_int8.for_cpus_without_vnni)
    with ovb.OvRunner(tmp / "m.xml", 8, x.shape[-1], "CPU", None, static_shapes=False,
                      without_vnni=ovb.without_vnni_here()) as run:
        got_ov = np.concatenate([run(x[i:i + 1]) for i in range(len(x))])
        ov_int8 = collections.Counter(
            op.get_rt_info()["layerType"].astype(str) for op in run.compiled.get_runtime_model().get_ordered_ops()
            if op.get_rt_info()["runtimePrecision"].astype(str) in ("i8", "u8"))
    linears = sum(1 for t in find_targets(onnx.load(str(fp32))) if t.op_type in ("MatMul", "Gemm")
                  and t.node in r.quantized)
    trt = tensorrt_valid(onnx.load(str(int8)))
    return {"model": kind, "recipe": r.recipe, "quantized": len(r.quantized), "float": len(r.excluded),
            "guarded": len(r.guarded), "attention": r.attention_products,
            "ort": (float(cosine(ref, got_ort).min()), float(correlation(ref, got_ort).mean())),
            "ov": (float(cosine(ref, got_ov).min()), float(correlation(ref, got_ov).mean())),
            "ort_kernels": kernels, "linears": linears,
            "float_fed": float_fed, "tensorrt_valid": trt,
            "ov_int8": {k: ov_int8[k] for k in ("FullyConnected", "MatMul", "Convolution", "Subgraph") if ov_int8[k]},
            "seconds": round(time.time() - t0)}


def table(rows: list[dict]) -> str:
    head = ("| model | recipe | INT8 / float products | ORT min cos / mean corr | OpenVINO min cos / mean corr "
            "| ORT INT8 kernels / quantized Linears | float fed by a weight DQ | OpenVINO i8/u8 layers "
            "| TensorRT Q/DQ rules |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error']} | | | | | | | |")
            continue
        guard = f", {r['guarded']} by the guard" if r["guarded"] else ""
        lines.append(f"| {r['model']} | {r['recipe']} | {r['quantized']} / {r['float']}{guard} "
                     f"| {r['ort'][0]:.5f} / {r['ort'][1]:.5f} | {r['ov'][0]:.5f} / {r['ov'][1]:.5f} "
                     f"| {r['ort_kernels']} / {r['linears']} | {r['float_fed']} "
                     f"| {', '.join(f'{k} {v}' for k, v in r['ov_int8'].items())} "
                     f"| {'met' if r['tensorrt_valid'] else 'NOT met'} |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    from int8_peers import cpu_name
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for kind in args.models.split(","):
        if kind not in MODELS:
            sys.exit(f"unknown model {kind!r}; one of: {', '.join(MODELS)}")
        with tempfile.TemporaryDirectory(prefix=f"family-{kind}-") as tmp:
            try:
                rows.append(measure(kind, Path(tmp)))
            except Exception as e:  # one architecture's failure is a row of the table, not the end of the run
                traceback.print_exc()
                rows.append({"model": kind, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    text = f"# INT8 across the ViT family\n\n{cpu_name()}, {stamp}\n\n{table(rows)}"
    out = REPO / "benchmarks" / "out" / "family_int8.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
