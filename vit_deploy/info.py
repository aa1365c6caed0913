"""Readable summaries of a bundle's manifest (`vit-deploy info`, the end of `export`)."""
from __future__ import annotations

from pathlib import Path

from .bundle import Bundle


def _size(path: Path, files: dict) -> int:
    return sum((path / f).stat().st_size for f in files if (path / f).exists())


def format_summary(manifest: dict, out_dir=None, verify: bool = False) -> str:
    m, pre = manifest["model"], manifest["preprocessing"]
    d = Path(out_dir) if out_dir else None
    w = manifest["source"].get("weights")
    kind = (f"embedding [{m.get('output_dim', '?')}] (no head)" if m.get("output") == "embedding"
            else f"{m['num_classes']} classes")
    lines = [f"model      {m['name']}  {m['img_size']} px, {kind}"
             + (", labelled" if m.get("labels") else ""),
             f"weights    {w['path']} ({w['layout']}, sha256 {w['sha256'][:12]}...)" if w else
             f"weights    random (seed {manifest['source'].get('seed', 0)}): for testing the pipeline only",
             f"preprocess resize {pre['resize_size']} {pre['interpolation']}, crop {pre['img_size']}, "
             f"mean {tuple(pre['mean'])}, std {tuple(pre['std'])}",
             "artifacts"]
    for a in manifest["artifacts"]:
        size = f"{_size(d, a.get('files', {})) / 1e6:8.1f} MB" if d else ""
        status = ""
        if verify and d:
            try:
                Bundle(d, manifest).verify(a)
                status = "  sha256 ok"
            except Exception as e:  # reported, not raised: info shows the state
                status = f"  CHANGED: {str(e).split(':')[0]}"
        lines.append(f"  {a['backend'] + '-' + a['precision']:<18} {a['path']:<32} {size}  sha256 {a['sha256'][:12]}{status}")
    from .backends.openvino_backend import describe_precision
    ov_precision = describe_precision(manifest["artifacts"])
    if ov_precision:
        lines.append(f"openvino   inference precision: {ov_precision}")
    q = next((a.get("quantization") for a in manifest["artifacts"] if a.get("quantization")), None)
    if q:
        bits = "8-bit" + (", pair-safe for 16-bit sums" if q.get("overflow_fix") == "all" else "")
        if q.get("seven_bit_weights"):
            bits += f", 7-bit on {len(q['seven_bit_weights'])} tensor(s)"
        if q.get("recipe"):
            scores = ", ".join(f"{k} {v['worst']:.5f}" for k, v in (q.get("recipe_scores") or {}).items())
            lines.append(f"int8       recipe {q['recipe']}" + (f" (worst output correlation: {scores})" if scores else ""))
        lines.append(f"int8       {q['method']} calibration on {len(q['calibration_images'])} images, "
                     f"{q['quantized_nodes']} matrix products, weights {bits} (overflow fix {q.get('overflow_fix', 'off')})")
        if q.get("smoothquant") is not None:
            lines.append(f"           outliers migrated at {q.get('smoothed_layernorms', 0)} LayerNorm(s) and "
                         f"{q.get('smoothed_products', 0)} other Linear input(s) (SmoothQuant {q['smoothquant']}), "
                         f"{q.get('bias_corrected', 0)} bias(es) corrected, {q.get('gptq_weights', 0)} weight(s) "
                         "rounded by GPTQ, "
                         f"{q.get('attention_products', 0)} attention product(s) in INT8")
    for s in manifest.get("skipped_targets") or []:
        lines.append(f"  skipped {s['runtime']}: {s['reason']}")
    p = manifest.get("parity")
    if p:
        verdict = "PASSED" if p["passed"] else "FAILED"
        lines.append(f"parity     {verdict} on {p['images']} images against {p['reference']} ({p['checked']})")
        for name, r in p["results"].items():
            lines.append(f"  {name:<18} max abs {r['max_abs']:.2e}  min cosine {r['min_cosine']:.5f}  "
                         f"top-1 agreement {'n/a' if r['top1_agreement'] is None else format(r['top1_agreement'], '.3f')}  "
                         f"{'ok' if r['passed'] else 'FAIL'}")
    lat = manifest.get("latency")
    if lat:
        lines.append(f"latency    {lat.get('machine', '')} ({lat.get('measured', '')})")
        for r in lat.get("results", []):
            lines.append(f"  {r['artifact']:<18} batch {r['batch']:<3} p50 {r['p50_ms']:8.2f} ms  {r['throughput']:8.1f} img/s")
    if manifest.get("last_export"):
        t = manifest["last_export"]["stage_seconds"]
        lines.append("stages     " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    if d:
        lines.append(f"bundle     {d}")
    return "\n".join(lines)


def info(bundle_dir) -> str:
    b = Bundle.open(bundle_dir)
    return format_summary(b.manifest, b.dir, verify=True)
