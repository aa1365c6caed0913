"""Time export + simplify + verify per model and report the peak resident memory.

Each model runs in its own process (`vit-deploy export --target onnx --no-check`
by default), so its peak RSS is that process's alone. Random weights; nothing is
downloaded. `--target/--precision` time the whole pipeline instead (with the check).

    python benchmarks/export_time.py vit-b16 vit-h14
    python benchmarks/export_time.py vit-h14 --target onnxruntime,openvino --precision fp32,int8
"""
from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(model: str, out: Path, target: str = "onnx", precision: str | None = None) -> dict:
    t = time.perf_counter()
    extra = ["--no-check"] if target == "onnx" else []
    extra += ["--precision", precision] if precision else []
    p = subprocess.run([sys.executable, "-m", "vit_deploy.cli", "export", "--model", model, "--target", target,
                        *extra, "--out", str(out), "--force", "--json"], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"{model}: export failed:\n{p.stderr}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    manifest = json.loads(p.stdout)
    onnx = next(a for a in manifest["artifacts"] if a["backend"] == "onnx" and a["precision"] == "fp32")
    weights_bytes = sum((out / model / f).stat().st_size for f in onnx["files"])
    return {"model": model, "wall_s": round(wall, 1), "stages_s": manifest["last_export"]["stage_seconds"],
            "peak_after": manifest["last_export"].get("peak_rss_gb_after", {}),
            "peak_rss_gb": round(peak_kb / 1e6, 2),
            "onnx_gb": round(weights_bytes / 1e9, 2), "peak_over_onnx": round(peak_kb * 1e3 / weights_bytes, 2),
            "files": list(onnx["files"]), "simplified": onnx["simplified"], "verification": onnx["verification"]}


def main(models: list[str], target: str = "onnx", precision: str | None = None) -> None:
    what = "export + simplify + verify" if target == "onnx" else f"export --target {target} --precision {precision}"
    print(f"{what}, random weights; {platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}")
    print("| model | wall s | stages s | peak RSS GB | ONNX GB | peak / ONNX | files | simplified | ORT vs PyTorch max abs (batch 1 / 4) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in models:
        with tempfile.TemporaryDirectory() as d:  # one process per model keeps peaks apart
            r = subprocess.run([sys.executable, __file__, "--one", m, d, target, precision or ""],
                               capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(r.stderr)
            row = json.loads(r.stdout)
        st = ", ".join(f"{k} {v}" + (f" ({row['peak_after'][k]} GB)" if k in row["peak_after"] else "")
                       for k, v in row["stages_s"].items())
        print(f"| {m} | {row['wall_s']} | {st} | {row['peak_rss_gb']} | {row['onnx_gb']} | "
              f"{row['peak_over_onnx']}x | {', '.join(row['files'])} | {row['simplified']} | "
              f"{row['verification']['batch1_max_abs_diff']:.1e} / {row['verification']['batch4_max_abs_diff']:.1e} |",
              flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(run(sys.argv[2], Path(sys.argv[3]), sys.argv[4], sys.argv[5] or None)))
    else:
        import argparse
        ap = argparse.ArgumentParser()
        ap.add_argument("models", nargs="*", default=["vit-b16", "vit-h14"])
        ap.add_argument("--target", default="onnx")
        ap.add_argument("--precision", default=None)
        a = ap.parse_args()
        main(a.models, a.target, a.precision)
