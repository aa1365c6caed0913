"""Where the time of vit-deploy's OpenVINO INT8 goes, against ONNX Runtime FP32: is a speed-up line reachable?

Builds the graph of int8_peers (vit-b16 by default: vit-deploy's own export, random weights,
no stand-in outliers), quantizes it with the default recipe, compiles it as `vit-deploy compile`
does, times ONNX Runtime FP32 and OpenVINO INT8 round-robin at one batch size, and then reads
OpenVINO's per-node performance counters: the time of each kind of node, and of each class of
INT8 matrix product with its throughput. The last line is the bound: ONNX Runtime FP32 over the
INT8 matrix products alone, the speed-up INT8 would have if every other node took no time.

    python benchmarks/int8_profile.py                          # vit-b16, batch 1
    python benchmarks/int8_profile.py --graph timm-vit --batch 8

Writes benchmarks/out/int8_profile.md.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import collections
import datetime
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import int8_peers as peers  # noqa: E402  (the graphs, the compiled artifacts, the runners)


def product_shapes(compiled) -> dict[str, tuple[int, int, int]]:
    """Runtime FullyConnected node -> (tokens per image, K, N), from its input and weight shapes."""
    out = {}
    for op in compiled.get_runtime_model().get_ops():
        if op.get_rt_info()["layerType"].astype(str) != "FullyConnected":
            continue
        x, w = op.input(0).get_partial_shape(), op.input(1).get_partial_shape()
        tokens = int(np.prod([d.get_length() for d in list(x)[1:-1]] or [1]))
        out[op.get_friendly_name()] = (tokens, w[1].get_length(), w[0].get_length())
    return out


def product_class(name: str) -> str:
    """A name without its block number: blocks.3/mlp/fc1/MatMul -> mlp/fc1/MatMul."""
    return re.sub(r"^.*?blocks?[._/]?\d+[/_.]", "", name.lstrip("/")) or name


def profile(xml: Path, x: np.ndarray, threads: int, iters: int):
    import openvino as ov
    compiled = ov.Core().compile_model(str(xml), "CPU", {
        "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
        "PERF_COUNT": True})
    req = compiled.create_infer_request()
    for _ in range(3):
        req.infer({0: x})
    by_kind, by_node = collections.defaultdict(list), collections.defaultdict(list)
    for _ in range(iters):
        req.infer({0: x})
        kinds = collections.defaultdict(float)
        for pi in req.profiling_info:
            if pi.status != pi.Status.EXECUTED:
                continue
            ms = pi.real_time.total_seconds() * 1000
            kinds[(pi.node_type, pi.exec_type)] += ms
            by_node[pi.node_name].append(ms)
        for k, v in kinds.items():
            by_kind[k].append(v)
    return ({k: float(np.median(v)) for k, v in by_kind.items()},
            {k: float(np.median(v)) for k, v in by_node.items()}, product_shapes(compiled))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graph", default="vit-b16", help="vit-b16 or a graph of tests/foreign_graphs.py")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "int8_profile.md")
    args = ap.parse_args()
    from vit_deploy.quantize import quantize

    graph_args = argparse.Namespace(small=False, mlp_outliers=False, massive_tokens=False, no_outliers=True)
    with tempfile.TemporaryDirectory(prefix="int8-profile-") as tmp:
        work = Path(tmp)
        fp32, pre, calib_dir, calib, photos, _ = peers.prepare_graph(args.graph, work / "graph", graph_args)
        int8 = work / "int8.onnx"
        quantize(fp32, calib_dir, int8, calib_size=len(calib), img_size=pre.img_size, mean=pre.mean, std=pre.std)
        xml = peers.ov_compiled(int8, work / "int8.xml", max(8, args.batch))
        ort_fp32 = peers.ort_runner(peers.ort_compiled(fp32, work / "fp32.ort.onnx", "fp32"), args.threads)
        ov_int8 = peers.ov_runner(xml, args.threads)
        x = np.ascontiguousarray(np.resize(photos, (args.batch, *photos.shape[1:])))
        times = peers.time_round_robin({"ORT FP32": ort_fp32, "OpenVINO INT8": ov_int8}, x, args.iters, warmup=1)
        p50 = {k: float(np.median(v)) for k, v in times.items()}
        kinds, nodes, shapes = profile(xml, x, args.threads, args.iters)

    total = sum(kinds.values())
    lines = [f"{datetime.date.today()} {datetime.datetime.now():%H:%M}, {peers.cpu_name()}, {args.graph}, "
             f"batch {args.batch}, {args.threads} threads, `python benchmarks/int8_profile.py --graph {args.graph} "
             f"--batch {args.batch}`", "",
             f"Round-robin p50: ONNX Runtime FP32 {p50['ORT FP32']:.1f} ms, OpenVINO INT8 {p50['OpenVINO INT8']:.1f} ms "
             f"= {p50['ORT FP32'] / p50['OpenVINO INT8']:.2f}x.", "",
             "| OpenVINO node kind (exec type) | ms (median over runs) | share |", "|---|---|---|"]
    for (kind, exec_type), ms in sorted(kinds.items(), key=lambda kv: -kv[1]):
        if ms >= 0.05:
            lines.append(f"| {kind} ({exec_type}) | {ms:.2f} | {100 * ms / total:.1f} % |")
    lines += ["", "| matrix product class | count | ms | GOP/s |", "|---|---|---|---|"]
    classes = collections.defaultdict(lambda: [0, 0.0, 0.0])
    int8_ms = 0.0
    for name, (tokens, k, n) in shapes.items():
        ms = nodes.get(name, 0.0)
        c = classes[product_class(name)]
        c[0] += 1
        c[1] += ms
        c[2] += 2 * args.batch * tokens * k * n
    int8_kinds = {key for key in kinds if key[0] == "FullyConnected" and "I8" in key[1].upper()}
    int8_ms = sum(kinds[key] for key in int8_kinds)
    for name, (count, ms, ops) in sorted(classes.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"| {name} | {count} | {ms:.2f} | {ops / ms / 1e6:.0f} |" if ms else f"| {name} | {count} | 0 | - |")
    lines += ["", f"Node time {total:.1f} ms, of which INT8 FullyConnected kernels {int8_ms:.1f} ms "
                  f"({100 * int8_ms / total:.0f} %). Bound with every other node free: ONNX Runtime FP32 / INT8 "
                  f"products = {p50['ORT FP32'] / int8_ms:.2f}x."]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
