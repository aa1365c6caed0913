"""`vit-deploy check`: every artifact of a bundle against the PyTorch reference
(or golden outputs saved elsewhere), with metrics, thresholds and reports.

Never imports torch when given a golden file: a device checks its engines
against outputs made on another machine.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from .bundle import Bundle
from .errors import CheckFailed, UserError
from .images import default_calibration_dir, list_images, load_images
from .metrics import cosine
from .zoo import Preprocessing

log = logging.getLogger("vit_deploy")

# Default gates per precision (issue #6); overridable per run and storable in the bundle.
THRESHOLDS = {
    "fp32": {"max_abs": 1e-3, "top1_agreement": 1.0},
    "fp16": {"min_cosine": 0.999, "top1_agreement": 0.99},
    "int8": {"min_cosine": 0.99, "top1_agreement": 0.98},
}
RANDOM_WEIGHTS_NOTE = ("random weights: top-1 agreement is reported but does not gate (the margins between "
                       "random logits are smaller than INT8 noise); cosine and error still gate")
EMBEDDING_NOTE = ("embedding model: top-1/top-5 agreement do not apply (n/a); cosine and max abs gate")


def metrics(ref: np.ndarray, got: np.ndarray, output: str = "logits") -> dict:
    """Error and cosine per image; top-1/top-5 agreement only for logits (None for embeddings)."""
    diff = np.abs(got.astype(np.float64) - ref)
    cos = cosine(ref, got)
    if output == "embedding":
        return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "min_cosine": float(cos.min()),
                "mean_cosine": float(cos.mean()), "top1_agreement": None, "top5_agreement": None}
    k = min(5, ref.shape[1])
    top_ref, top_got = np.argsort(-ref, 1)[:, :k], np.argsort(-got, 1)[:, :k]
    overlap = [len(set(r) & set(g)) / k for r, g in zip(top_ref, top_got)]
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
            "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
            "top5_agreement": float(np.mean(overlap))}


def accuracy(logits: np.ndarray, labels: np.ndarray) -> dict:
    k = min(5, logits.shape[1])
    top = np.argsort(-logits, 1)[:, :k]
    return {"top1": float((top[:, 0] == labels).mean()), "top5": float((top == labels[:, None]).any(1).mean())}


def gate(m: dict, limits: dict, gate_top1: bool) -> list[str]:
    """The names of the metrics that miss their limits."""
    failed = []
    if "max_abs" in limits and m["max_abs"] > limits["max_abs"]:
        failed.append(f"max_abs {m['max_abs']:.3g} > {limits['max_abs']:g}")
    if "min_cosine" in limits and m["min_cosine"] < limits["min_cosine"]:
        failed.append(f"min_cosine {m['min_cosine']:.5f} < {limits['min_cosine']:g}")
    if gate_top1 and "top1_agreement" in limits and m["top1_agreement"] is not None \
            and m["top1_agreement"] < limits["top1_agreement"]:
        failed.append(f"top1_agreement {m['top1_agreement']:.4f} < {limits['top1_agreement']:g}")
    return failed


# ------------------------------------------------------------------ inputs

def _labels_from_dir(labels_dir: Path, num_classes: int, class_names) -> tuple[list[Path], np.ndarray]:
    csv = labels_dir if labels_dir.is_file() else None
    if csv is not None:
        import csv as csvmod
        rows = list(csvmod.reader(csv.read_text().splitlines()))
        rows = [r for r in rows if r and r[0] != "file"]
        paths, labels = [], []
        for f, lab in rows:
            paths.append((csv.parent / f).resolve())
            labels.append(_label_index(lab, class_names, num_classes, csv))
        return paths, np.array(labels)
    if not labels_dir.is_dir():
        raise UserError(f"labels folder not found: {labels_dir}")
    classes = sorted(p.name for p in labels_dir.iterdir() if p.is_dir())
    if class_names:
        unknown = [c for c in classes if c not in class_names]
        if unknown:
            raise UserError(f"{labels_dir}: class folder '{unknown[0]}' is not one of the model's class names")
        index = {c: class_names.index(c) for c in classes}
    else:
        if len(classes) != num_classes:
            raise UserError(f"{labels_dir}: has {len(classes)} class folders, the model has {num_classes} classes")
        index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for c in classes:
        for p in list_images(labels_dir / c):
            paths.append(p)
            labels.append(index[c])
    return paths, np.array(labels)


def _label_index(lab: str, class_names, num_classes: int, where: Path) -> int:
    if lab.isdigit() and int(lab) < num_classes:
        return int(lab)
    if class_names and lab in class_names:
        return class_names.index(lab)
    raise UserError(f"{where}: label '{lab}' is neither a class index below {num_classes} nor a class name")


def default_check_images(bundle: Bundle) -> list[Path]:
    """The calibration photos not used for calibration (all of them when nothing was quantized)."""
    q = next((a.get("quantization") for a in bundle.artifacts if a.get("quantization")), None)
    if q:
        d = Path(q["calibration_dir"])
        held = set(q["held_out_images"])
        if d.is_dir() and held:
            return [p for p in list_images(d) if p.name in held]
    return list_images(default_calibration_dir())


# ------------------------------------------------------------------ golden files

def save_golden(path, inputs: np.ndarray, logits: np.ndarray, manifest: dict, names: list[str]) -> None:
    from .atomic import atomic_path
    meta = {"model": manifest["model"]["name"], "img_size": manifest["model"]["img_size"],
            "num_classes": manifest["model"]["num_classes"], "preprocessing": manifest["preprocessing"],
            "weights_sha256": (manifest["source"].get("weights") or {}).get("sha256"), "images": names,
            "made": time.strftime("%Y-%m-%d %H:%M:%S")}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, inputs=inputs.astype(np.float32), logits=logits.astype(np.float32), meta=np.array(json.dumps(meta)))


def load_golden(path, manifest: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    try:
        with np.load(path, allow_pickle=False) as z:
            inputs, logits, meta = z["inputs"], z["logits"], json.loads(str(z["meta"]))
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"{path}: not a vit-deploy golden file ({type(e).__name__})") from None
    m = manifest["model"]
    for key, have in (("model", m["name"]), ("img_size", m["img_size"]), ("num_classes", m["num_classes"])):
        if meta.get(key) != have:
            raise UserError(f"{path}: golden file was made for {key}={meta.get(key)}, this bundle has {key}={have}")
    return inputs, logits, meta


# ------------------------------------------------------------------ the check

def check(bundle_dir, images=None, labels_dir=None, backends=None, json_out=None, markdown=None, junit=None,
          save_golden_to=None, golden=None, thresholds: dict | None = None, weights=None, max_images: int = 64,
          threads: int | None = None, batch: int = 8, record: bool = True) -> dict:
    """Run every artifact (or those of `backends`) and compare with the reference; see module doc."""
    bundle = Bundle.open(bundle_dir)
    report = run_check(bundle, images=images, labels_dir=labels_dir, backends=backends, save_golden_to=save_golden_to,
                       golden=golden, thresholds=thresholds, weights=weights, max_images=max_images,
                       threads=threads, batch=batch)
    write_reports(report, json_out, markdown, junit)
    if record:
        with Bundle.writing(bundle.dir) as tx:
            tx.manifest["parity"] = summary(report)
            tx.commit()
    if not report["passed"]:
        bad = [f"{r['artifact']}: {'; '.join(r['failed'])}" for r in report["results"] if not r["passed"]]
        err = CheckFailed("parity check failed: " + " | ".join(bad))
        err.report = report
        raise err
    return report


def stage_check(tx, model) -> dict:
    """Pipeline stage: check the bundle being written, with the in-memory reference model."""
    report = run_check(tx.bundle, reference_model=model)
    tx.manifest["parity"] = summary(report)
    for line in format_table(report).splitlines():
        log.info("%s", line)
    if not report["passed"]:
        bad = [f"{r['artifact']}: {'; '.join(r['failed'])}" for r in report["results"] if not r["passed"]]
        log.warning("parity check FAILED: %s", " | ".join(bad))
    return report


def run_check(bundle: Bundle, images=None, labels_dir=None, backends=None, save_golden_to=None, golden=None,
              thresholds=None, weights=None, max_images: int = 64, threads=None, batch: int = 8,
              reference_model=None) -> dict:
    from .backends import open_runner

    t0 = time.perf_counter()
    man = bundle.manifest
    pre_bundle = Preprocessing.from_dict(man["preprocessing"])
    output = man["model"].get("output", "logits")
    labels = None
    names: list[str] = []
    if golden:
        inputs, ref_logits, gmeta = load_golden(golden, man)
        names = gmeta.get("images", [])
        reference = "golden:" + Path(golden).name
        art_inputs = inputs
    else:
        paths = [] if images else default_check_images(bundle)
        if images:
            paths += list_images(images)
        label_paths, label_idx = [], None
        if labels_dir and output == "embedding":
            raise UserError(f"{bundle.dir}: --labels-dir needs class scores, and this bundle's model outputs "
                            f"embeddings (no classification head)")
        if labels_dir:
            label_paths, label_idx = _labels_from_dir(Path(labels_dir), man["model"]["num_classes"], man["model"].get("labels"))
        paths = paths[: max(0, max_images - len(label_paths))] + label_paths
        model = reference_model
        if model is None:
            from ._optional import require_torch
            require_torch("check without --golden", "compare with outputs saved elsewhere: --golden FILE")
            from .sources import build_reference
            model = build_reference(man, weights)
        # the reference sees images as the model expects them; artifacts as the bundle says
        ref_inputs, ok = load_images(paths, model.preprocessing)
        art_inputs = ref_inputs if model.preprocessing == pre_bundle else load_images(ok, pre_bundle)[0]
        if label_idx is not None:
            keep = {p: i for p, i in zip(label_paths, label_idx)}
            mask = [p in keep for p in ok]
            labels = np.array([keep[p] for p in ok if p in keep])
        names = [p.name for p in ok]
        from .backends.torch_backend import TorchRunner
        with TorchRunner(model, max_batch=len(ref_inputs), threads=threads) as r:
            ref_logits = np.concatenate([r(ref_inputs[i:i + batch]) for i in range(0, len(ref_inputs), batch)])
        del model, r  # the artifacts run next: do not hold the PyTorch weights beside them
        inputs = ref_inputs
        reference = "torch"
        if save_golden_to:
            save_golden(save_golden_to, ref_inputs, ref_logits, man, names)
    limits = {p: dict(v) for p, v in THRESHOLDS.items()}
    for src in (man.get("thresholds") or {}, thresholds or {}):
        for p, v in src.items():
            limits.setdefault(p, {}).update(v)
    gate_top1 = bool(man["source"].get("weights"))
    results = []
    from .progress import progress
    chosen = [a for a in bundle.artifacts if not backends or a["backend"] in backends]
    for art in progress(chosen, len(chosen), "checking artifacts"):
        t = time.perf_counter()
        with open_runner(bundle, art, threads=threads) as runner:
            step = min(batch, runner.max_batch)
            got = np.concatenate([runner(art_inputs[i:i + step]) for i in range(0, len(art_inputs), step)])
        m = metrics(ref_logits, got, output)
        if labels is not None:
            m.update({f"{k}_accuracy": v for k, v in accuracy(got[mask], labels).items()})
        failed = gate(m, limits[art["precision"]], gate_top1)
        results.append({"artifact": f"{art['backend']}-{art['precision']}", "path": art["path"],
                        "backend": art["backend"], "precision": art["precision"], "metrics": m,
                        "limits": limits[art["precision"]], "failed": failed, "passed": not failed,
                        "seconds": round(time.perf_counter() - t, 2)})
    if not results:
        have = ", ".join(sorted({a["backend"] for a in bundle.artifacts})) or "nothing"
        raise UserError(f"{bundle.dir}: no artifact for backend(s) {', '.join(backends or [])}; the bundle has {have}")
    report = {"bundle": str(bundle.dir), "model": man["model"]["name"], "reference": reference,
              "images": len(inputs), "image_names": names, "passed": all(r["passed"] for r in results),
              "results": results, "seconds": round(time.perf_counter() - t0, 1),
              "output": output,
              "note": EMBEDDING_NOTE if output == "embedding" else None if gate_top1 else RANDOM_WEIGHTS_NOTE}
    if labels is not None:
        report["reference_accuracy"] = accuracy(ref_logits[mask], labels)
        for r in results:
            r["metrics"]["top1_accuracy_delta"] = r["metrics"]["top1_accuracy"] - report["reference_accuracy"]["top1"]
    return report


def summary(report: dict) -> dict:
    return {"passed": report["passed"], "reference": report["reference"], "images": report["images"],
            "checked": time.strftime("%Y-%m-%d %H:%M:%S"), "note": report["note"],
            "results": {r["artifact"]: {"passed": r["passed"], **{k: r["metrics"][k] for k in
                        ("max_abs", "min_cosine", "top1_agreement")}} for r in report["results"]}}


# ------------------------------------------------------------------ reports

COLUMNS = ("max_abs", "mean_abs", "min_cosine", "top1_agreement", "top5_agreement")


def format_table(report: dict, markdown: bool = False) -> str:
    cols = list(COLUMNS) + (["top1_accuracy", "top1_accuracy_delta"] if "reference_accuracy" in report else [])
    head = ["artifact", "precision"] + cols + ["result"]
    rows = []
    for r in report["results"]:
        m = r["metrics"]
        rows.append([r["artifact"], r["precision"]] + ["n/a" if m[c] is None else f"{m[c]:.3g}" if "abs" in c
                                                       else f"{m[c]:.4f}" for c in cols]
                    + ["PASS" if r["passed"] else "FAIL: " + "; ".join(r["failed"])])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    else:
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        lines = ["  ".join(str(x).ljust(w) for x, w in zip(head, widths))]
        lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rows]
    lines.append(f"{report['images']} images, reference {report['reference']}, {report['seconds']} s"
                 + (f"; {report['note']}" if report["note"] else ""))
    return "\n".join(lines)


def junit_xml(report: dict) -> str:
    from xml.sax.saxutils import quoteattr
    fails = sum(not r["passed"] for r in report["results"])
    out = ['<?xml version="1.0" encoding="utf-8"?>',
           f'<testsuite name="vit-deploy-check" tests="{len(report["results"])}" failures="{fails}" '
           f'time="{report["seconds"]}">']
    for r in report["results"]:
        out.append(f'  <testcase classname={quoteattr(report["model"])} name={quoteattr(r["artifact"])} time="{r["seconds"]}">')
        if not r["passed"]:
            out.append(f'    <failure message={quoteattr("; ".join(r["failed"]))}/>')
        out.append("  </testcase>")
    out.append("</testsuite>")
    return "\n".join(out) + "\n"


def write_reports(report: dict, json_out=None, markdown=None, junit=None) -> None:
    from .atomic import atomic_path, write_json
    if json_out:
        write_json(json_out, report)
    for path, text in ((markdown, lambda: format_table(report, markdown=True) + "\n"), (junit, lambda: junit_xml(report))):
        if path:
            with atomic_path(path) as tmp:
                tmp.write_text(text())
