"""`vit-deploy bench`: latency per artifact and batch size, measured interleaved.

Every artifact is loaded first, warmed up (lazy initialisation, allocator and
thread-pool start-up), then timed round-robin: one call of each in turn, so a
noisy neighbour or a frequency change hits all of them alike.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np

from .bundle import Bundle
from .cpu import INT8_DOT_PRODUCT, x86_flags
from .errors import UserError

log = logging.getLogger("vit_deploy")


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:
        return float("nan")


def device_info() -> dict:
    info = {"machine": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
        flags = x86_flags(text) or set()
        info["isa"] = {f: f in flags for f in ("avx2", "avx512f", *INT8_DOT_PRODUCT, "avx512_bf16", "amx_tile")}
    except OSError:
        info["cpu"] = platform.processor()
    import shutil
    import subprocess
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        info["gpu"] = r.stdout.strip() or None
    else:
        info["gpu"] = None
    from .backends import runtime_versions
    info["runtimes"] = runtime_versions()
    return info


def _stats(times: list[float], batch: int) -> dict:
    t = np.array(times) * 1000
    return {"p50_ms": float(np.percentile(t, 50)), "p90_ms": float(np.percentile(t, 90)),
            "p99_ms": float(np.percentile(t, 99)), "mean_ms": float(t.mean()), "std_ms": float(t.std()),
            "iterations": len(t), "throughput": float(batch * 1000 / t.mean())}


def bench(bundle_dir, backends=None, precisions=None, batches=(1,), threads: int | None = None, warmup: int = 5,
          iters: int | None = None, duration: float | None = None, include_torch: bool = True,
          record: bool = True) -> dict:
    from .backends import open_runner
    if iters is not None and duration is not None:
        raise UserError("--iters and --duration exclude each other: give one")
    if iters is None and duration is None:
        iters = 20
    bundle = Bundle.open(bundle_dir)
    arts = [a for a in bundle.artifacts if (not backends or a["backend"] in backends)
            and (not precisions or a["precision"] in precisions)]
    want_torch = include_torch and (not backends or "torch" in backends) and (not precisions or "fp32" in precisions)
    if want_torch and not backends:  # the eager reference is optional unless asked for by name
        from ._optional import missing_torch
        why = missing_torch()
        if why:
            log.info("left out the PyTorch eager reference: %s", why)
            want_torch = False
    if not arts and not want_torch:
        have = ", ".join(f"{a['backend']}-{a['precision']}" for a in bundle.artifacts) or "nothing"
        raise UserError(f"{bundle.dir}: no artifact for {', '.join(backends or [])} "
                        f"{', '.join(precisions or [])}; the bundle has {have}")
    img = bundle.manifest["model"]["img_size"]
    max_batch = bundle.manifest.get("max_batch", 32)
    runners, loads = {}, {}
    try:
        if want_torch:
            from ._optional import require_torch
            require_torch("bench --backends torch")
            from .backends.torch_backend import TorchRunner
            from .sources import build_reference
            t, before = time.perf_counter(), rss_mb()
            runners["torch-fp32"] = TorchRunner(build_reference(bundle.manifest), max_batch, threads)
            loads["torch-fp32"] = {"load_s": time.perf_counter() - t, "rss_delta_mb": rss_mb() - before}
        for a in arts:
            name = f"{a['backend']}-{a['precision']}"
            t, before = time.perf_counter(), rss_mb()
            runners[name] = open_runner(bundle, a, threads=threads)
            loads[name] = {"load_s": time.perf_counter() - t, "rss_delta_mb": rss_mb() - before}
        results = []
        for batch in batches:
            if batch > max_batch:
                log.warning("batch %d skipped: over the bundle's max batch %d", batch, max_batch)
                continue
            x = np.random.default_rng(batch).standard_normal((batch, 3, img, img)).astype(np.float32)
            for _ in range(warmup):
                for r in runners.values():
                    r(x)
            times = {n: [] for n in runners}
            start = time.perf_counter()
            i = 0
            while (i < iters) if iters is not None else (time.perf_counter() - start < duration or i < 3):
                for n, r in runners.items():
                    t = time.perf_counter()
                    r(x)
                    times[n].append(time.perf_counter() - t)
                i += 1
            for n in runners:
                results.append({"artifact": n, "batch": batch, **_stats(times[n], batch), **loads[n]})
    finally:
        for r in runners.values():
            r.close()
    if not results:
        raise UserError(f"no batch size fits the bundle's max batch {max_batch}")
    ref_name = next((n for n in ("onnxruntime-fp32", "onnx-fp32", "openvino-fp32", "torch-fp32") if n in runners), None)
    for batch in {r["batch"] for r in results}:
        rows = [r for r in results if r["batch"] == batch]
        ref = next((r for r in rows if r["artifact"] == ref_name), None)
        eager = next((r for r in rows if r["artifact"] == "torch-fp32"), None)
        fastest = min(rows, key=lambda r: r["p50_ms"])
        for r in rows:
            r["speedup_vs_reference"] = ref["p50_ms"] / r["p50_ms"] if ref else None
            r["speedup_vs_torch"] = eager["p50_ms"] / r["p50_ms"] if eager else None
            r["fastest"] = r is fastest
    report = {"bundle": str(bundle.dir), "model": bundle.manifest["model"]["name"], "reference": ref_name,
              "threads": threads, "warmup": warmup, "iters": iters, "duration": duration,
              "measured": time.strftime("%Y-%m-%d %H:%M:%S"), "device": device_info(),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, "results": results}
    report["machine"] = f"{report['device'].get('cpu', '')}, {report['device']['cores']} cores"
    report["int8_not_faster"] = int8_not_faster(results)
    if record:
        with Bundle.writing(bundle.dir) as tx:
            tx.manifest["latency"] = {k: report[k] for k in ("measured", "machine", "reference", "threads", "results")}
            tx.commit()
    return report


def int8_not_faster(results: list[dict]) -> list[dict]:
    """Runtimes whose INT8 artifact is no faster than their own FP32 one at some batch size.
    It happens: on x86 without VNNI (AVX2 only) OpenVINO 2026.4 runs INT8 FullyConnected
    layers through a generic gemm: a DINOv2 ViT-S/14 took 127.5 ms in INT8 against 106.9 ms
    in FP32, NNCF's files 129.1-132.7 ms (benchmarks/real_vit.py, README); a user who deploys
    the INT8 engine there gives up accuracy for nothing, so bench says so."""
    p50 = {(r["artifact"], r["batch"]): r["p50_ms"] for r in results}
    found = []
    for r in results:
        runtime, _, precision = r["artifact"].rpartition("-")
        fp32 = p50.get((f"{runtime}-fp32", r["batch"]))
        if precision == "int8" and fp32 is not None and r["p50_ms"] >= fp32:
            found.append({"runtime": runtime, "batch": r["batch"], "speedup": fp32 / r["p50_ms"]})
    return found


def _int8_notes(report: dict) -> list[str]:
    isa = report.get("device", {}).get("isa") or {}
    why = " (this CPU has no VNNI: x86 INT8 matrix kernels gain little or nothing without it)" if \
        isa.get("avx2") and not any(isa.get(f) for f in (*INT8_DOT_PRODUCT, "amx_tile")) else ""
    return [f"note: {f['runtime']}-int8 runs at {f['speedup']:.2f}x {f['runtime']}-fp32 at batch {f['batch']}: "
            f"on this machine the FP32 artifact is the faster one{why}" for f in report.get("int8_not_faster", [])]


def format_table(report: dict, markdown: bool = False) -> str:
    head = ["artifact", "batch", "p50 ms", "p90 ms", "p99 ms", "mean ms", "std ms", "img/s", "load s",
            f"x vs {report['reference']}", "x vs torch"]
    rows = []
    for r in sorted(report["results"], key=lambda r: (r["batch"], r["p50_ms"])):
        f = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
        rows.append([r["artifact"] + (" *" if r["fastest"] else ""), str(r["batch"]), f"{r['p50_ms']:.1f}",
                     f"{r['p90_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['mean_ms']:.1f}", f"{r['std_ms']:.1f}",
                     f"{r['throughput']:.1f}", f"{r['load_s']:.1f}", f(r["speedup_vs_reference"]), f(r["speedup_vs_torch"])])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    else:
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        lines = ["  ".join(x.ljust(w) for x, w in zip(head, widths))]
        lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in rows]
    lines.append(f"* fastest; {report['machine']}; threads {report['threads'] or 'default'}; {report['measured']}; "
                 f"peak RSS {report['peak_rss_mb']:.0f} MB (all artifacts loaded together)")
    lines += _int8_notes(report)
    return "\n".join(lines)


def to_csv(report: dict) -> str:
    buf = io.StringIO()
    keys = ["artifact", "batch", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "throughput", "load_s",
            "rss_delta_mb", "speedup_vs_reference", "speedup_vs_torch"]
    w = csv.DictWriter(buf, keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(report["results"])
    return buf.getvalue()


def plot(report: dict, path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'vit-deploy[plot]'") from None
    res = report["results"]
    arts = list(dict.fromkeys(r["artifact"] for r in res))
    batches = sorted({r["batch"] for r in res})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(arts) * len(batches)), 4.5))
    width = 0.8 / len(batches)
    for j, b in enumerate(batches):
        p50 = [next((r["p50_ms"] for r in res if r["artifact"] == a and r["batch"] == b), 0) for a in arts]
        p90 = [next((r["p90_ms"] for r in res if r["artifact"] == a and r["batch"] == b), 0) for a in arts]
        xs = np.arange(len(arts)) + j * width
        ax.bar(xs, p50, width, label=f"batch {b} p50")
        ax.errorbar(xs, p50, yerr=[np.zeros(len(arts)), np.array(p90) - np.array(p50)], fmt="none", ecolor="black",
                    capsize=3, label="p90" if j == 0 else None)
        for x, v in zip(xs, p50):
            ax.text(x, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(np.arange(len(arts)) + width * (len(batches) - 1) / 2)
    ax.set_xticklabels(arts, rotation=20, ha="right")
    ax.set_ylabel("latency per batch (ms), lower is better")
    ax.set_title(f"{report['model']} on {report['machine']} ({report['measured'][:10]})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from .atomic import atomic_path
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
