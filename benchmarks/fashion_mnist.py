"""The trained reference model: vit-ti16 (the zoo's code) trained on Fashion-MNIST,
then FP32 / FP16 / INT8 top-1 accuracy on the 10,000 test images for every runtime.

Random weights cannot tell a good INT8 model from a bad one (their top-1 margins
are smaller than quantization noise); a trained model can.

    python benchmarks/fashion_mnist.py [--epochs 1] [--retrain] [--markdown benchmarks/out/fmnist.md]

Data: Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist/);
installed with apt-get when missing and running as root. Nothing is downloaded
any other way.
"""
from __future__ import annotations

import argparse
import gzip
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
DATA = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IMG = 32          # 28 px upsampled to 32: 2x2 patches of 16 px for vit-ti16
SEED = 0


def find_data() -> Path:
    if not (DATA / "t10k-images-idx3-ubyte.gz").is_file() and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not (DATA / "t10k-images-idx3-ubyte.gz").is_file():
        raise SystemExit(f"Fashion-MNIST not found in {DATA}: install Debian's package dataset-fashion-mnist "
                         f"(apt-get install dataset-fashion-mnist) or set FASHION_MNIST_DIR")
    return DATA


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
    d = find_data()
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(d / f"{prefix}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(d / f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return images, labels


def to_inputs(images: np.ndarray) -> np.ndarray:
    """uint8 [N,28,28] -> float32 [N,3,32,32]: bicubic upsample, grey to RGB, mean = std = 0.5."""
    import torch
    import torch.nn.functional as F
    x = torch.from_numpy(images.copy()).float().div(255).unsqueeze(1)
    x = F.interpolate(x, size=(IMG, IMG), mode="bicubic", align_corners=False).clamp(0, 1)
    return ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous().numpy()


def weights_path() -> Path:
    return OUT / "fmnist-vit-ti16.safetensors"


def train(epochs: int = 1, batch: int = 128, lr: float = 1e-3) -> Path:
    import torch
    from vit_deploy import build_model, save_weights
    torch.manual_seed(SEED)
    torch.set_num_threads(os.cpu_count() or 2)
    images, labels = load("train")
    x, y = torch.from_numpy(to_inputs(images)), torch.from_numpy(labels)
    model = build_model("vit-ti16", num_classes=10, img_size=IMG).train().requires_grad_(True)
    # foreach: one kernel per step for all parameters, 18 % less time per epoch than the loop
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, foreach=True)
    steps = epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(SEED)
    t = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(len(x) // batch):
            idx = order[i * batch:(i + 1) * batch]
            xb = x[idx]
            flip = torch.rand(len(xb), generator=g) < 0.5  # horizontal flips: cheap, label-preserving
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = torch.nn.functional.cross_entropy(model(xb), y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, {time.perf_counter() - t:.0f} s", file=sys.stderr)
    model.eval()
    OUT.mkdir(parents=True, exist_ok=True)
    from vit_deploy.zoo import Preprocessing
    # what to_inputs() does, so every runtime sees the images as in training
    save_weights(model, weights_path(), labels=CLASSES, preprocessing=Preprocessing(img_size=IMG, crop_pct=1.0))
    return weights_path()


def ensure_trained(epochs: int = 1) -> Path:
    return weights_path() if weights_path().is_file() else train(epochs)


def calibration_dir(n: int = 64) -> Path:
    """n training images (not test images) as PNG files, for `--calib-dir`."""
    from PIL import Image
    d = OUT / f"fmnist-calib-{n}"
    if not d.is_dir():
        images, _ = load("train")
        tmp = Path(tempfile.mkdtemp(dir=OUT))
        rng = np.random.default_rng(SEED)
        for i in rng.choice(len(images), n, replace=False):
            Image.fromarray(images[i]).save(tmp / f"train_{i:05d}.png")
        tmp.rename(d)
    return d


def build_bundle(out: Path, targets: str = "onnxruntime,openvino", precisions: str = "fp32,fp16,int8") -> Path:
    from vit_deploy.pipeline import export
    # crop_pct 1.0 / bicubic / 0.5: the same preprocessing the model was trained with
    export(model="vit-ti16", weights=str(ensure_trained()), target=targets, precision=precisions, out=out,
           calib_dir=calibration_dir(), calib_size=64, check=False, quiet=True, max_batch=256)
    return out / "vit-ti16"


def evaluate(bundle_dir: Path, limit: int | None = None) -> dict:
    """Top-1 accuracy of every artifact (and PyTorch) on the test images, and agreement with FP32."""
    from vit_deploy import Bundle
    from vit_deploy.backends import open_runner
    from vit_deploy.backends.torch_backend import TorchRunner
    from vit_deploy.pipeline import build_reference
    images, labels = load("test")
    if limit:
        images, labels = images[:limit], labels[:limit]
    x = to_inputs(images)
    bundle = Bundle.open(bundle_dir)
    preds = {}
    model = build_reference(bundle.manifest)
    runners = [("torch-fp32", lambda: TorchRunner(model, 256))]
    runners += [(f"{a['backend']}-{a['precision']}", lambda a=a: open_runner(bundle, a)) for a in bundle.artifacts]
    for name, make in runners:
        with make() as r:
            preds[name] = np.concatenate([r(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)])
    rows = {}
    for name, p in preds.items():
        fp32 = preds[name.rsplit("-", 1)[0] + "-fp32"] if name.rsplit("-", 1)[0] + "-fp32" in preds else preds["onnx-fp32"]
        rows[name] = {"top1": float((p == labels).mean()), "agreement_with_fp32": float((p == fp32).mean())}
    return {"images": len(labels), "results": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--markdown", default=str(OUT / "fmnist.md"))
    args = ap.parse_args()
    if args.retrain and weights_path().exists():
        weights_path().unlink()
    t = time.perf_counter()
    ensure_trained(args.epochs)
    with tempfile.TemporaryDirectory() as d:
        result = evaluate(build_bundle(Path(d)))
    lines = [f"Fashion-MNIST test set ({result['images']} images), vit-ti16 at {IMG} px trained by this script; "
             f"{platform.machine()}, {time.strftime('%Y-%m-%d')}", "",
             "| artifact | top-1 % | vs its runtime's FP32 (points) | top-1 agreement with FP32 % |", "|---|---|---|---|"]
    res = result["results"]
    for name, r in res.items():
        base = res.get(name.rsplit("-", 1)[0] + "-fp32", res["onnx-fp32"])
        lines.append(f"| {name} | {100 * r['top1']:.2f} | {100 * (r['top1'] - base['top1']):+.2f} | "
                     f"{100 * r['agreement_with_fp32']:.2f} |")
    text = "\n".join(lines)
    print(text)
    Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
    Path(args.markdown).write_text(text + "\n")
    print(f"({time.perf_counter() - t:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
