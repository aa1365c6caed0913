"""vit-deploy's INT8 against the quantizers its users would pick instead, side by side.

For each ViT graph as users bring it (tests/foreign_graphs.py: vit-deploy's own export,
timm exports, Hugging Face exports at opset 14 and 17), with the outlier stand-in
applied (vit_deploy/layernorm_scaling.inject_outliers: a few LayerNorm channels 20-100x,
as trained ViTs carry them; FP32 outputs unchanged) and, with --mlp-outliers, the
massive post-GELU channels at the fc2 inputs (inject_mlp_outliers; a new FP32 model, which
is then the reference), one round-robin timing run of:
FP32 on ONNX Runtime and OpenVINO; vit-deploy's INT8 (the artifacts `compile` builds
from the portable Q/DQ file: its OpenVINO IR and its ONNX Runtime form); NNCF's
OpenVINO API; NNCF's ONNX backend on both runtimes; ONNX Runtime's dynamic quantization. Fidelity against FP32
on the held-out shipped photos: min cosine and mean correlation of the outputs. Speed
against the faster of NNCF's two OpenVINO results is also given paired: the median over
rounds of each round's time ratio, which a busy neighbour on a shared machine moves
less than a ratio of two medians. The
trained Fashion-MNIST model (benchmarks/fashion_mnist.py) adds top-1 on its test set.

    python benchmarks/int8_peers.py                       # every graph, batch 1 and 8
    python benchmarks/int8_peers.py --graphs hf-vit-op14 --batches 1 --iters 20
    python benchmarks/int8_peers.py --graphs vit-b16 --no-outliers   # the 3.0x line
    python benchmarks/int8_peers.py --mlp-outliers --batches 1     # both stand-ins
    python benchmarks/int8_peers.py --massive-tokens --small --batches 1

Needs `pip install nncf timm transformers`. Writes benchmarks/out/int8_peers.md.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from vit_deploy.metrics import correlation, cosine as cosines  # noqa: E402,F401  (per image; also what quantize and check use)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
        flags = next(ln for ln in out.splitlines() if ln.startswith("Flags"))
        isa = "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX2 (no VNNI)"
        return f"{name}, {isa}, {platform.machine()}"
    except Exception:
        return platform.processor() or platform.machine()



def time_round_robin(runners: dict, x: np.ndarray, iters: int, warmup: int = 3) -> dict[str, list[float]]:
    """{name: [ms per call]}: round-robin, each round starting one artifact later, so drift on
    a shared machine hits all alike and no artifact always runs right after the same neighbour."""
    for run in runners.values():
        for _ in range(warmup):
            run(x)
    times = {k: [] for k in runners}
    names = list(runners)
    for i in range(iters):
        for k in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            runners[k](x)
            times[k].append((time.perf_counter() - t0) * 1000)
    return times


def ort_runner(path: Path, threads: int):
    from vit_deploy.backends.onnxruntime_backend import OrtRunner
    r = OrtRunner(path, 64, 0, threads)
    return lambda x: r.session.run(None, {r.input: x})[0]


def ov_runner(path: Path, threads: int):
    import openvino as ov
    c = ov.Core().compile_model(str(path), "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                                                   "INFERENCE_PRECISION_HINT": "f32"})
    req = c.create_infer_request()
    return lambda x: np.array(req.infer({0: x})[c.outputs[0]], copy=True)


def vd_ov_runner(path: Path, threads: int, without_vnni: bool):
    """vit-deploy's OpenVINO INT8 artifact as its runner opens it (on x86 without VNNI: the
    attention products in float and int8 activations, backends/openvino_int8.for_cpus_without_vnni)."""
    from vit_deploy.backends.openvino_backend import OvRunner
    r = OvRunner(path, 64, 0, "CPU", threads, static_shapes=False, without_vnni=without_vnni)
    return lambda x: np.array(r.request.infer({0: x})[r.compiled.outputs[0]], copy=True)


def ort_compiled(src: Path, out: Path, precision: str) -> Path:
    """vit-deploy's ONNX Runtime artifact (for int8: the uint8-activation form, see backends/ort_int8.py)."""
    from vit_deploy.backends.onnxruntime_backend import compile as ort_compile
    ort_compile(src, out, precision, {})
    return out


def ov_compiled(src: Path, out: Path, max_batch: int) -> Path:
    """vit-deploy's OpenVINO artifact (for int8: uint8 activations on the weight products, see
    backends/openvino_int8.py), as `vit-deploy compile` writes it."""
    from vit_deploy.backends.openvino_backend import compile as ov_compile
    ov_compile(src, out, "int8", {"max_batch": max_batch})
    return out


def nncf_models(fp32: Path, calib: np.ndarray, work: Path) -> dict[str, Path]:
    import nncf
    import onnx
    import openvino as ov
    nncf.set_log_level(logging.ERROR)
    m = onnx.load(str(fp32))
    name = m.graph.input[0].name
    ds = nncf.Dataset(list(calib), lambda a: {name: a[None]})
    q = nncf.quantize(m, ds, model_type=nncf.ModelType.TRANSFORMER, preset=nncf.QuantizationPreset.PERFORMANCE,
                      subset_size=len(calib))
    onnx_path = work / "nncf_onnx.onnx"
    onnx.save(q, str(onnx_path))
    ov_model = ov.convert_model(str(fp32))
    ds_ov = nncf.Dataset(list(calib), lambda a: a[None])
    q_ov = nncf.quantize(ov_model, ds_ov, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib))
    ov_path = work / "nncf_ov.xml"
    ov.save_model(q_ov, str(ov_path))
    return {"onnx": onnx_path, "ov": ov_path}


def ort_dynamic(fp32: Path, work: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    out = work / "ort_dynamic.onnx"
    quantize_dynamic(str(fp32), str(out), per_channel=True, weight_type=QuantType.QInt8)
    return out


def prepare_graph(kind: str, work: Path, args):
    """(FP32 ONNX to quantize, its preprocessing, calibration dir, calibration inputs, judged inputs, labels or None)."""
    import onnx

    from foreign_graphs import make_graph
    from vit_deploy.images import default_calibration_dir, list_images, load_images, split_for_calibration
    from vit_deploy.layernorm_scaling import inject_massive_tokens, inject_mlp_outliers, inject_outliers
    from vit_deploy.quantize import preprocessing_of

    if kind == "fashion-mnist":  # trained: judged by top-1 on the test set, no stand-in outliers
        import fashion_mnist as fm
        bundle = fm.build_bundle(work, targets="onnx", precisions="fp32")
        fp32 = bundle / "model.onnx"
        pre, _ = preprocessing_of(onnx.load(str(fp32)), fp32)
        calib, _ = load_images(list_images(fm.calibration_dir()), pre)
        images, labels = fm.load("test")
        n = args.fmnist_images
        return fp32, pre, fm.calibration_dir(), calib, fm.to_inputs(images[:n]), labels[:n]
    if kind == "vit-b16":
        from vit_deploy.models import build_model
        from vit_deploy.onnx_export import export_onnx, simplify_onnx
        work.mkdir(parents=True, exist_ok=True)
        src = work / "vit-b16.onnx"
        model = build_model("vit-b16").eval()
        export_onnx(model, src, 17, {"preprocessing": model.preprocessing.to_dict()})
        simplify_onnx(src)
    else:
        src = make_graph(kind, work, small=args.small)
    fp32 = src
    if args.mlp_outliers:  # a different function: every artifact is judged against this FP32
        fp32 = work / f"{kind}.mlp-outliers.onnx"
        onnx.save(inject_mlp_outliers(onnx.load(str(src))), str(fp32))
    if args.massive_tokens:  # also a different function
        onnx.save(inject_massive_tokens(onnx.load(str(fp32))), str(work / f"{kind}.massive.onnx"))
        fp32 = work / f"{kind}.massive.onnx"
    if not args.no_outliers:
        onnx.save(inject_outliers(onnx.load(str(fp32))), str(work / f"{kind}.outliers.onnx"))
        fp32 = work / f"{kind}.outliers.onnx"
    calib_dir = default_calibration_dir()
    calib_paths, held = split_for_calibration(list_images(calib_dir), 32)
    pre, _ = preprocessing_of(onnx.load(str(src)), src)
    return fp32, pre, calib_dir, load_images(calib_paths, pre)[0], load_images(held, pre)[0], None


def run_graph(kind: str, work: Path, args) -> list[dict]:
    from vit_deploy.quantize import quantize

    fp32, pre, calib_dir, calib, photos, labels = prepare_graph(kind, work, args)
    t = time.perf_counter()
    vd = work / "vit_deploy.int8.onnx"
    quantize(fp32, calib_dir, vd, calib_size=len(calib), img_size=pre.img_size,
             mean=pre.mean, std=pre.std)
    seconds = {"vit-deploy": time.perf_counter() - t}
    plain = work / "vit_deploy.no-attention.int8.onnx"  # the option, measured beside the default
    quantize(fp32, calib_dir, plain, calib_size=len(calib), attention=False, img_size=pre.img_size,
             mean=pre.mean, std=pre.std)
    t = time.perf_counter()
    peers = nncf_models(fp32, calib, work)
    seconds["nncf"] = time.perf_counter() - t
    dyn = ort_dynamic(fp32, work)
    th = args.threads
    max_batch = max(64, *args.batches)  # the Fashion-MNIST accuracy pass runs batches of 64
    from vit_deploy.backends.openvino_backend import without_vnni_here
    here = without_vnni_here()
    runners = {
        "ORT FP32": ort_runner(ort_compiled(fp32, work / "fp32.ort.onnx", "fp32"), th),
        "OpenVINO FP32": ov_runner(fp32, th),
        "vit-deploy INT8, ORT": ort_runner(ort_compiled(vd, work / "vd.int8.ort.onnx", "int8"), th),
        "vit-deploy INT8, OpenVINO": vd_ov_runner(ov_compiled(vd, work / "vd.int8.xml", max_batch), th, here),
        "vit-deploy INT8 --no-attention, OpenVINO": vd_ov_runner(
            ov_compiled(plain, work / "vd.no-attention.int8.xml", max_batch), th, here),
        **({"vit-deploy INT8, OpenVINO, the VNNI form": vd_ov_runner(work / "vd.int8.xml", th, False)}
           if here else {}),  # what this CPU would run without the no-VNNI rewrites, measured beside it
        "NNCF OpenVINO API, OpenVINO": ov_runner(peers["ov"], th),
        "NNCF ONNX, OpenVINO": ov_runner(peers["onnx"], th),
        "NNCF ONNX, ORT": ort_runner(peers["onnx"], th),
        "ORT quantize_dynamic, ORT": ort_runner(dyn, th),
    }
    def outputs(run):
        step = 1 if labels is None else 64
        return np.concatenate([run(photos[i:i + step]) for i in range(0, len(photos), step)])
    ref = outputs(runners["ORT FP32"])
    quality = {}
    for name, run in runners.items():
        got = outputs(run)
        c, r = cosines(ref, got), correlation(ref, got)
        top1 = agree = None
        if labels is not None:
            top1, agree = float((got.argmax(1) == labels).mean()), float((got.argmax(1) == ref.argmax(1)).mean())
        quality[name] = (float(c.min()), float(r.mean()), float(r.min()), top1, agree)
    rows = []
    for batch in args.batches:
        x = np.ascontiguousarray(np.resize(photos, (batch, *photos.shape[1:])))
        times = time_round_robin(runners, x, args.iters)
        p50 = {k: float(np.median(v)) for k, v in times.items()}
        # the acceptance's yardstick, paired round by round: time / the faster NNCF OpenVINO result's
        best = min(("NNCF OpenVINO API, OpenVINO", "NNCF ONNX, OpenVINO"), key=p50.get)
        paired = {k: float(np.median(np.array(times[k]) / np.array(times[best]))) for k in runners}
        for k in runners:
            rows.append({"graph": kind, "batch": batch, "artifact": k, "p50_ms": p50[k],
                         "x_ort_fp32": p50["ORT FP32"] / p50[k], "vs_nncf_ov": paired[k], "min_cos": quality[k][0],
                         "corr_mean": quality[k][1], "corr_worst": quality[k][2], "top1": quality[k][3],
                         "agreement": quality[k][4]})
    print(f"[{kind}] quantize seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| graph | batch | artifact | p50 ms | x ORT FP32 | / faster NNCF OV | min cosine | correlation mean / worst "
             "| top-1 % / agreement % |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = f"{100 * r['top1']:.2f} / {100 * r['agreement']:.2f}" if r.get("top1") is not None else "-"
        lines.append(f"| {r['graph']} | {r['batch']} | {r['artifact']} | {r['p50_ms']:.1f} | {r['x_ort_fp32']:.2f} | "
                     f"{r['vs_nncf_ov']:.3f} | {r['min_cos']:.5f} | {r['corr_mean']:.5f} / {r['corr_worst']:.5f} | {acc} |")
    return "\n".join(lines)


def main() -> None:
    from foreign_graphs import DYNAMO_GRAPHS, GRAPHS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graphs", default=",".join(GRAPHS) + ",fashion-mnist",
                    help="comma-separated: " + ", ".join(GRAPHS + DYNAMO_GRAPHS) + ", fashion-mnist, vit-b16")
    ap.add_argument("--fmnist-images", type=int, default=2000, help="Fashion-MNIST test images judged")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="2-layer 64-px graphs (a quick run, not the table)")
    ap.add_argument("--no-outliers", action="store_true", help="no LayerNorm outlier stand-in (inject_outliers)")
    ap.add_argument("--mlp-outliers", action="store_true",
                    help="also the massive fc2-input channels of trained ViTs (inject_mlp_outliers)")
    ap.add_argument("--massive-tokens", action="store_true",
                    help="also a few tokens with a huge residual value on two channels (inject_massive_tokens)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "int8_peers.md")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    logging.getLogger("vit_deploy").setLevel(logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory(prefix="int8-peers-") as tmp:
        for kind in args.graphs.split(","):
            rows += run_graph(kind, Path(tmp) / kind, args)
            print(table([r for r in rows if r["graph"] == kind]), flush=True)
    head = (f"{datetime.date.today()}, {cpu_name()}, {args.threads} threads, LayerNorm outliers "
            f"{'off' if args.no_outliers else 'on'}, MLP outliers {'on' if args.mlp_outliers else 'off'}, "
            f"massive tokens {'on' if args.massive_tokens else 'off'}")
    text = head + "\n\n" + table(rows) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
