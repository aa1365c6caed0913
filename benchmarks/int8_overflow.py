"""The INT8 overflow fix, side by side in one run: full 8-bit weights (`off`),
7-bit weights on the layer that reads the image (`first-layer`, NNCF's default)
and the fix everywhere (`all`, vit-deploy's default for CPU runtimes: Linear weights
8-bit made pair-safe, see vit_deploy/weight_pairs.py; convolutions 7-bit).

For each: the logits' cosine to FP32 on the held-out photos (vit-b16, random
weights) and top-1 accuracy / agreement on the 10,000 Fashion-MNIST test images
(the trained reference model), on ONNX Runtime and OpenVINO with their INT8
kernels, and "exact": the same Q/DQ model with ONNX Runtime's graph
optimizations off, so every op runs in float. That is what an INT8 kernel
without saturation computes (a CPU with VNNI, or a GPU), whatever this CPU is.

    python benchmarks/int8_overflow.py [--skip-fmnist]
    python benchmarks/int8_overflow.py --emulate Haswell --fmnist-images 2000

`--emulate CPU` runs the two runtimes' INT8 kernels under qemu user-mode emulation of
that CPU model (`qemu-x86_64-static -cpu Haswell`: AVX2, no AVX-512, no VNNI), so the
non-VNNI kernels are measured on any x86 machine; everything else runs natively.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
FIXES = ("off", "first-layer", "all")


def runners(path: Path, threads: int = 2) -> dict:
    import onnxruntime as ort
    import openvino as ov

    from vit_deploy.backends.onnxruntime_backend import session_options
    out = {}
    for name, level in (("onnxruntime", ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
                        ("exact", ort.GraphOptimizationLevel.ORT_DISABLE_ALL)):
        so = session_options(threads)
        so.graph_optimization_level = level
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        out[name] = lambda x, s=s: s.run(None, {"images": x})[0]
    c = ov.Core().compile_model(str(path), "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                                                   "INFERENCE_PRECISION_HINT": "f32"})
    out["openvino"] = lambda x: np.array(c(x)[c.outputs[0]])
    return out


def batched(f, x, size=256):
    return np.concatenate([f(x[i:i + size]) for i in range(0, len(x), size)])


QEMU = "/usr/bin/qemu-x86_64-static"


def kernel_outputs(models: list[Path], x: np.ndarray, size: int, emulate: str | None) -> dict:
    """{(model, runtime): outputs} of ONNX Runtime's and OpenVINO's INT8 kernels, here or
    in a child process under qemu emulating the CPU model `emulate`."""
    if not emulate:
        out = {}
        for m in models:
            rs = runners(m)
            out.update({(m, rt): batched(rs[rt], x, size) for rt in ("onnxruntime", "openvino")})
        return out
    import json
    import subprocess
    work = Path(tempfile.mkdtemp(prefix="int8-overflow-"))
    np.save(work / "x.npy", x)
    (work / "job.json").write_text(json.dumps({"models": [str(m) for m in models], "size": size}))
    subprocess.run([QEMU, "-cpu", emulate, sys.executable, __file__, "--child", str(work)], check=True)
    return {(m, rt): np.load(work / f"{i}.{rt}.npy") for i, m in enumerate(models) for rt in ("onnxruntime", "openvino")}


def child(work: Path) -> None:
    import json
    job = json.loads((work / "job.json").read_text())
    x = np.load(work / "x.npy")
    for i, m in enumerate(job["models"]):
        rs = runners(Path(m))
        for rt in ("onnxruntime", "openvino"):
            np.save(work / f"{i}.{rt}.npy", batched(rs[rt], x, job["size"]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-fmnist", action="store_true")
    ap.add_argument("--fmnist-images", type=int, default=10000)
    ap.add_argument("--emulate", metavar="CPU", help="run the INT8 kernels under qemu-x86_64 -cpu CPU (e.g. Haswell)")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    from vit_deploy.bench import device_info
    from vit_deploy.images import list_images, load_images
    from vit_deploy.parity import cosine
    from vit_deploy.pipeline import export
    from vit_deploy.quantize import quantize
    from vit_deploy.zoo import Preprocessing
    t0 = time.perf_counter()
    info = device_info()
    isa = ", ".join(k for k, v in info.get("isa", {}).items() if v) or "unknown"
    where = f"; INT8 kernels under qemu-x86_64 -cpu {args.emulate}" if args.emulate else ""
    print(f"{info.get('cpu', platform.processor())} ({isa}){where}; {time.strftime('%Y-%m-%d %H:%M')}\n")
    out = Path(tempfile.mkdtemp())
    export(model="vit-b16", out=out, check=False, quiet=True)
    fp32 = out / "vit-b16" / "model.onnx"
    from vit_deploy.images import default_calibration_dir
    calib = default_calibration_dir()
    rows = []
    held = None
    for fix in FIXES:
        r = quantize(fp32, calib, out / f"{fix}.onnx", calib_size=32, overflow_fix=fix)
        held = held or [p for p in list_images(calib) if p.name in set(r.held_out_images)]
        rows.append((fix, out / f"{fix}.onnx"))
    photos, _ = load_images(held, Preprocessing())
    want = batched(runners(fp32)["exact"], photos, 8)
    kernels = kernel_outputs([m for _, m in rows], photos, 8, args.emulate)
    print(f"vit-b16, random weights, 32 calibration photos; logit cosine to FP32 on {len(photos)} held-out photos "
          f"(min / mean)\n")
    print("| weights | ONNX Runtime INT8 | OpenVINO INT8 | exact Q/DQ arithmetic |\n|---|---|---|---|")
    for fix, m in rows:
        cells = []
        for rt in ("onnxruntime", "openvino", "exact"):
            got = batched(runners(m)["exact"], photos, 8) if rt == "exact" else kernels[(m, rt)]
            c = cosine(want, got)
            cells.append(f"{c.min():.5f} / {c.mean():.5f}")
        print(f"| {fix} | " + " | ".join(cells) + " |")
    if not args.skip_fmnist:
        import fashion_mnist as fm
        export(model="vit-ti16", weights=str(fm.ensure_trained()), out=out, check=False, quiet=True, max_batch=256)
        tfp32 = out / "vit-ti16" / "model.onnx"
        images, labels = fm.load("test")
        images, labels = images[:args.fmnist_images], labels[:args.fmnist_images]
        xt = fm.to_inputs(images)
        p32 = batched(runners(tfp32)["exact"], xt).argmax(1)
        print(f"\nFashion-MNIST test set ({len(labels)} images), trained vit-ti16, FP32 top-1 "
              f"{100 * (p32 == labels).mean():.2f}%; top-1 % / agreement with FP32 %\n")
        print("| weights | ONNX Runtime INT8 | OpenVINO INT8 | exact Q/DQ arithmetic |\n|---|---|---|---|")
        for fix in FIXES:
            quantize(tfp32, fm.calibration_dir(), out / f"t_{fix}.onnx", calib_size=64, overflow_fix=fix)
        trained = {fix: out / f"t_{fix}.onnx" for fix in FIXES}
        kernels = kernel_outputs(list(trained.values()), xt, 256, args.emulate)
        for fix, m in trained.items():
            cells = []
            for rt in ("onnxruntime", "openvino", "exact"):
                p = (batched(runners(m)["exact"], xt) if rt == "exact" else kernels[(m, rt)]).argmax(1)
                cells.append(f"{100 * (p == labels).mean():.2f} / {100 * (p == p32).mean():.2f}")
            print(f"| {fix} | " + " | ".join(cells) + " |")
    print(f"\n({time.perf_counter() - t0:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
