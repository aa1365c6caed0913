"""The numbers behind the README: vit-b16 on every available runtime and precision.

Builds the bundle (random weights), times INT8 quantization with 64 calibration
images, runs `vit-deploy bench` twice (interleaved round-robin, batch 1,
2 threads), times PyTorch eager and ONNX Runtime FP32 independently (a plain
loop around each runtime's own call), and measures this machine's FP32 and INT8
matrix-product ceilings, then writes one markdown table.

    python benchmarks/latency.py [--model vit-b16] [--iters 30] [--out benchmarks/out]
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `vit-deploy bench` does: no busy-waiting between runtimes

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _ort_matmul_gops(a_type, b_type, out_type, feed, threads: int, n: int = 2048) -> float:
    import onnxruntime as ort
    from onnx import helper
    op = "MatMulInteger" if out_type == 6 else "MatMul"  # 6 = TensorProto.INT32
    g = helper.make_graph([helper.make_node(op, ["a", "b"], ["y"])], "mm",
                          [helper.make_tensor_value_info("a", a_type, [n, n]),
                           helper.make_tensor_value_info("b", b_type, [n, n])],
                          [helper.make_tensor_value_info("y", out_type, [n, n])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    for _ in range(3):
        s.run(None, feed)
    t, k = time.perf_counter(), 10
    for _ in range(k):
        s.run(None, feed)
    return 2 * n ** 3 * k / (time.perf_counter() - t) / 1e9


def fp32_ceiling(threads: int) -> float:
    """GFLOP/s of large FP32 GEMMs: the best of torch (1024^3, 2048^3) and ONNX Runtime (2048^3).
    A runtime's tuned kernels can beat this probe slightly (fractions a little over 100%)."""
    import torch
    from onnx import TensorProto
    torch.set_num_threads(threads)
    torch_gflops = 0.0
    for size in (1024, 2048):
        a, b = torch.randn(size, size), torch.randn(size, size)
        for _ in range(3):
            a @ b
        t, n = time.perf_counter(), 20
        for _ in range(n):
            a @ b
        torch_gflops = max(torch_gflops, 2 * size ** 3 * n / (time.perf_counter() - t) / 1e9)
    rng = np.random.default_rng(0)
    feed = {"a": rng.standard_normal((2048, 2048), dtype=np.float32), "b": rng.standard_normal((2048, 2048), dtype=np.float32)}
    return max(torch_gflops, _ort_matmul_gops(TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT, feed, threads))


def int8_ceiling(threads: int) -> float:
    """GOP/s of a large uint8 x int8 MatMulInteger in ONNX Runtime (the kernel family its INT8 path uses)."""
    from onnx import TensorProto
    rng = np.random.default_rng(0)
    feed = {"a": rng.integers(0, 255, (2048, 2048), dtype=np.uint8), "b": rng.integers(-127, 127, (2048, 2048), dtype=np.int8)}
    return _ort_matmul_gops(TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32, feed, threads)


def independent_timing(bundle_dir: Path, threads: int, iters: int) -> dict:
    """Plain loops around torch's forward and ORT's session.run, interleaved, no vit-deploy runner."""
    import onnxruntime as ort
    import torch
    from vit_deploy import Bundle
    from vit_deploy.pipeline import build_reference
    b = Bundle.open(bundle_dir)
    model = build_reference(b.manifest)
    torch.set_num_threads(threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(bundle_dir / b.find("onnxruntime", "fp32")["path"]), so,
                                providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    xt = torch.from_numpy(x)
    calls = {"torch-fp32": lambda: model(xt), "onnxruntime-fp32": lambda: sess.run(None, {"images": x})}
    times = {k: [] for k in calls}
    with torch.inference_mode():
        for _ in range(5):
            for f in calls.values():
                f()
        for _ in range(iters):
            for k, f in calls.items():
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v) * 1000) for k, v in times.items()}


def time_quantization(bundle_dir: Path, n_images: int = 64) -> float:
    """Fresh calibration + Q/DQ of the bundle's FP32 model with n images (shipped photos + mirrored copies)."""
    from PIL import Image, ImageOps
    from vit_deploy.images import default_calibration_dir, list_images
    from vit_deploy.quantize import quantize
    with tempfile.TemporaryDirectory() as d:
        photos = list_images(default_calibration_dir())
        for p in photos:
            shutil.copy(p, d)
        for p in photos[: max(0, n_images - len(photos))]:
            ImageOps.mirror(Image.open(p)).save(Path(d) / f"mirrored_{p.name}")
        t = time.perf_counter()
        quantize(bundle_dir / "model.onnx", d, Path(d) / "q.onnx", calib_size=n_images, recalibrate=True)
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit-b16")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    args = ap.parse_args()
    from vit_deploy.bench import bench, device_info
    from vit_deploy.models import count_model
    from vit_deploy.pipeline import export
    from vit_deploy.zoo import get_spec
    out = Path(args.out)
    export(model=args.model, target="onnxruntime,openvino", precision="fp32,fp16,int8", out=out / "bundles", quiet=True)
    bundle = out / "bundles" / args.model
    quant_s = time_quantization(bundle)
    runs = [bench(bundle, batches=(1,), threads=args.threads, iters=args.iters, warmup=5, record=i == 1)
            for i in range(2)]
    indep = independent_timing(bundle, args.threads, args.iters)
    ceil32, ceil8 = fp32_ceiling(args.threads), int8_ceiling(args.threads)
    _, gflops = count_model(get_spec(args.model))
    dev = device_info()
    r1 = {r["artifact"]: r for r in runs[0]["results"]}
    r2 = {r["artifact"]: r for r in runs[1]["results"]}
    eager, ortfp32 = r2["torch-fp32"]["p50_ms"], r2["onnxruntime-fp32"]["p50_ms"]
    lines = [f"{args.model}, batch 1, {args.threads} threads, random weights; {dev.get('cpu')} "
             f"({dev['cores']} cores, AVX-512 VNNI: {dev.get('isa', {}).get('avx512_vnni')}); "
             f"{time.strftime('%Y-%m-%d')}; `python benchmarks/latency.py`", "",
             "| artifact | p50 ms (run 1) | p50 ms (run 2) | run-to-run | x vs PyTorch eager | x vs ORT FP32 | "
             "fraction of ceiling |", "|---|---|---|---|---|---|---|"]
    for name, r in sorted(r2.items(), key=lambda kv: kv[1]["p50_ms"]):
        ceiling = ceil8 if name.endswith("int8") else ceil32
        frac = gflops / (r["p50_ms"] / 1000) / ceiling
        drift = abs(r["p50_ms"] - r1[name]["p50_ms"]) / r1[name]["p50_ms"]
        lines.append(f"| {name} | {r1[name]['p50_ms']:.1f} | {r['p50_ms']:.1f} | {100 * drift:.1f}% | "
                     f"{eager / r['p50_ms']:.2f} | {ortfp32 / r['p50_ms']:.2f} | {100 * frac:.0f}% |")
    lines += ["", f"Ceilings on this machine: FP32 GEMM {ceil32:.0f} GFLOP/s (best of torch and ORT MatMul, 1024^3 and 2048^3), INT8 {ceil8:.0f} GOP/s "
              f"(ORT MatMulInteger, 2048^3); {args.model} is {gflops:.1f} GFLOP per image.",
              f"Independent timing (plain loops, same run): PyTorch eager {indep['torch-fp32']:.1f} ms "
              f"(bench: {eager:.1f}, {100 * (eager / indep['torch-fp32'] - 1):+.1f}%), ONNX Runtime FP32 "
              f"{indep['onnxruntime-fp32']:.1f} ms (bench: {ortfp32:.1f}, "
              f"{100 * (ortfp32 / indep['onnxruntime-fp32'] - 1):+.1f}%).",
              f"INT8 quantization of the FP32 model with 64 calibration images: {quant_s:.1f} s."]
    text = "\n".join(lines)
    print(text)
    (out / "latency.md").write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
