"""Symmetric (int8, zero point 0) vs asymmetric (uint8 with zero point) activations,
side by side in one run: speed on ONNX Runtime and OpenVINO for vit-b16, and
fidelity on held-out photos (vit-b16) and on the trained Fashion-MNIST model.

    python benchmarks/int8_schemes.py
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def runners(path: Path, threads: int = 2):
    import onnxruntime as ort
    import openvino as ov
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    c = ov.Core().compile_model(str(path), "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                                                   "INFERENCE_PRECISION_HINT": "f32"})
    req = c.create_infer_request()
    return {"onnxruntime": lambda x: s.run(None, {"images": x})[0],
            "openvino": lambda x: np.array(req.infer({0: x})[c.outputs[0]])}


def main() -> None:
    from vit_deploy.images import list_images, load_images
    from vit_deploy.pipeline import export
    from vit_deploy.quantize import cosine, quantize
    from vit_deploy.zoo import Preprocessing
    out = Path(tempfile.mkdtemp())
    export(model="vit-b16", out=out, check=False, quiet=True)
    fp32 = out / "vit-b16" / "model.onnx"
    from vit_deploy.images import default_calibration_dir
    calib = default_calibration_dir()
    models, held = {}, None
    for scheme in ("symmetric", "asymmetric"):
        r = quantize(fp32, calib, out / f"{scheme}.onnx", calib_size=32, scheme=scheme)
        models[scheme] = runners(out / f"{scheme}.onnx")
        held = [p for p in list_images(calib) if p.name in set(r.held_out_images)]
    ref = runners(fp32)["onnxruntime"]
    photos, _ = load_images(held, Preprocessing())
    want = np.concatenate([ref(photos[i:i + 1]) for i in range(len(photos))])
    x = photos[:1]
    calls = {f"{s}/{rt}": f for s, rs in models.items() for rt, f in rs.items()}
    for f in calls.values():
        for _ in range(3):
            f(x)
    times = {k: [] for k in calls}
    for _ in range(20):
        for k, f in calls.items():
            t = time.perf_counter()
            f(x)
            times[k].append(time.perf_counter() - t)
    print(f"vit-b16 batch 1, 2 threads, {time.strftime('%Y-%m-%d')}, 32 calibration photos, "
          f"{len(photos)} held-out photos\n")
    print("| scheme / runtime | p50 ms | min cosine vs FP32 | mean cosine |\n|---|---|---|---|")
    for k, f in calls.items():
        got = np.concatenate([f(photos[i:i + 1]) for i in range(len(photos))])
        c = cosine(want, got)
        print(f"| {k} | {1000 * np.median(times[k]):.1f} | {c.min():.5f} | {c.mean():.5f} |")
    # the trained model: accuracy and agreement on the 10,000 test images
    import fashion_mnist as fm
    from vit_deploy.pipeline import export as ex
    ex(model="vit-ti16", weights=str(fm.ensure_trained()), out=out, check=False, quiet=True, max_batch=256)
    tfp32 = out / "vit-ti16" / "model.onnx"
    images, labels = fm.load("test")
    xt = fm.to_inputs(images)
    base = runners(tfp32)["onnxruntime"]
    p32 = np.concatenate([base(xt[i:i + 500]) for i in range(0, len(xt), 500)]).argmax(1)
    print(f"\nFashion-MNIST test set: FP32 top-1 {100 * (p32 == labels).mean():.2f}%\n")
    print("| scheme / runtime | top-1 % | agreement with FP32 % |\n|---|---|---|")
    for scheme in ("symmetric", "asymmetric"):
        quantize(tfp32, fm.calibration_dir(), out / f"t_{scheme}.onnx", calib_size=64, scheme=scheme)
        for rt, f in runners(out / f"t_{scheme}.onnx").items():
            p = np.concatenate([f(xt[i:i + 500]) for i in range(0, len(xt), 500)]).argmax(1)
            print(f"| {scheme}/{rt} | {100 * (p == labels).mean():.2f} | {100 * (p == p32).mean():.2f} |")


if __name__ == "__main__":
    main()
