"""Headless checkpoints at full size (issue 12): the reference article's models whose only
published timm weights have no head (`vit_base_r50_s16_224`, `vit_huge_patch14_224`: num_classes=0).

For each: timm builds the model with its default (headless) construction from random weights,
its state dict goes to a .safetensors file, `vit-deploy export --model ZOO --weights FILE`
makes an embedding bundle, and the bundle's model.onnx is compared on ONNX Runtime with
timm's own `forward_head(forward_features(x), pre_logits=True)` at batches 1 and 4.
Too big for the test suite (the tests do the same at small sizes); nothing is downloaded.

    python benchmarks/headless_models.py r50-vit-b16 --target onnxruntime,openvino
    python benchmarks/headless_models.py vit-h14 --target onnx
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TIMM_NAME = {"r50-vit-b16": "vit_base_r50_s16_224", "vit-h14": "vit_huge_patch14_224",
             "vit-l32": "vit_large_patch32_224"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=sorted(TIMM_NAME))
    ap.add_argument("--target", default="onnxruntime,openvino")
    ap.add_argument("--out", default=None, help="Keep the bundle here (default: a temporary directory).")
    args = ap.parse_args()

    import onnxruntime as ort
    import timm
    import torch
    from safetensors.torch import save_file

    work = Path(args.out or tempfile.mkdtemp(prefix="headless-"))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    ref = timm.create_model(TIMM_NAME[args.model], pretrained=False).eval()  # timm's default: num_classes=0
    assert ref.num_classes == 0, ref.num_classes
    weights = work / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(weights))
    rng = np.random.default_rng(0)
    xs = {b: rng.standard_normal((b, 3, 224, 224)).astype(np.float32) for b in (1, 4)}
    with torch.no_grad():
        want = {b: ref.forward_head(ref.forward_features(torch.from_numpy(x)), pre_logits=True).numpy()
                for b, x in xs.items()}
    del ref

    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "vit_deploy.cli", "export", "--model", args.model, "--weights",
                        str(weights), "--target", args.target, "--out", str(work), "--force", "--json"],
                       capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if p.returncode not in (0, 1):
        raise SystemExit(f"export failed ({p.returncode}):\n{p.stderr}")
    manifest = json.loads(p.stdout)
    bundle = work / args.model
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    out_name = sess.get_outputs()[0].name
    diffs = {}
    for b, x in xs.items():
        got = sess.run(None, {"images": x})[0]
        assert got.shape == want[b].shape, (got.shape, want[b].shape)
        diffs[b] = float(np.abs(got - want[b]).max())
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
    print(f"{args.model} (timm {TIMM_NAME[args.model]}, headless, random weights) on {platform.node()}, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"  manifest model.output={manifest['model']['output']} output_dim={manifest['model']['output_dim']}, "
          f"ONNX output '{out_name}'")
    print(f"  ONNX Runtime FP32 vs timm forward_head(pre_logits=True): max abs {diffs[1]:.2e} (batch 1), "
          f"{diffs[4]:.2e} (batch 4)  [limit 1e-4: {'ok' if max(diffs.values()) <= 1e-4 else 'FAIL'}]")
    print(f"  export wall {seconds:.0f} s, peak RSS of the export process {peak_gb:.1f} GB, "
          f"stages {manifest.get('last_export', {}).get('stage_seconds')}")
    parity = manifest.get("parity")
    if parity:
        print(f"  check {'PASSED' if parity['passed'] else 'FAILED'} on {parity['images']} images: "
              + ", ".join(f"{k} max abs {v['max_abs']:.2e} min cosine {v['min_cosine']:.5f}"
                          for k, v in parity["results"].items()))
    if max(diffs.values()) > 1e-4 or (parity and not parity["passed"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
