"""The `vit-deploy` command: a thin click layer over the library API.

Each command imports what it needs when it runs, so `vit-deploy models` never
loads a runtime. Errors a user can cause print one line and exit 2.
"""
from __future__ import annotations

import functools
import json
import logging
import sys

import click

from .errors import CheckFailed, UserError


def _handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except CheckFailed as e:
            click.echo(f"FAILED: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
    return wrapper


class _Formatter(logging.Formatter):
    def format(self, record):
        prefix = "warning: " if record.levelno >= logging.WARNING else ""
        return prefix + record.getMessage()


def _setup_logging(quiet: bool) -> None:
    log = logging.getLogger("vit_deploy")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Formatter())
        log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vit-deploy")
def cli():
    """Vision Transformers from a PyTorch checkpoint to verified edge engines."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@_handle_errors
def models(as_json):
    """List the model zoo with parameters and GFLOPs at 224 px, 1000 classes."""
    from .zoo_table import list_models
    rows = list_models()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    head = f"{'name':<12} {'patch':>5} {'layers':>6} {'hidden':>6} {'mlp':>5} {'heads':>5} {'params':>9} {'GFLOPs':>7}"
    click.echo(head)
    for r in rows:
        patch = f"{r['patch_size']}" + ("*" if r["backbone_layers"] else "")
        click.echo(f"{r['name']:<12} {patch:>5} {r['layers']:>6} {r['hidden_size']:>6} {r['mlp_size']:>5} "
                   f"{r['heads']:>5} {r['params'] / 1e6:>8.2f}M {r['gflops']:>7.2f}")
    click.echo("* hybrid: 1x1 patches on the 14x14x1024 map of a ResNet-50 v2 backbone (stages 3/4/9)")
    from .sources import OTHER_SOURCES
    click.echo(OTHER_SOURCES)


def _csv(ctx, param, value):
    if value is None:
        return None
    return [x.strip() for v in (value if isinstance(value, tuple) else (value,)) for x in str(v).split(",") if x.strip()] or None


def _engine_options(fn):
    """Options of the compile stage, shared by `export` and `compile`."""
    for opt in reversed([
        click.option("--device", default="CPU", show_default=True, help="OpenVINO device: CPU, GPU, NPU, AUTO."),
        click.option("--opt-batch", type=int, default=1, show_default=True, help="TensorRT profile's optimal batch."),
        click.option("--workspace-mb", type=int, default=2048, show_default=True, help="TensorRT workspace limit."),
        click.option("--dla-core", type=int, default=None, help="TensorRT on a Jetson's DLA core N."),
    ]):
        fn = opt(fn)
    return fn


# quantize.OVERFLOW_FIXES, spelled out so the CLI does not import onnx to build its help.
_overflow_fix_option = click.option(
    "--overflow-fix", type=click.Choice(["auto", "all", "first-layer", "off"]), default="auto", show_default=True,
    help="7-bit INT8 weights, which CPUs without VNNI cannot saturate; auto: all layers unless only TensorRT runs it.")


@cli.command()
@click.option("--model", "model_name", default="vit-b16", show_default=True,
              help="Zoo name, timm:NAME or a Hugging Face model directory (hf:DIR); see `vit-deploy models`.")
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
              help="timm constructor argument, e.g. depth=2 (repeatable; VALUE read as JSON when it parses).")
@click.option("--target", default="onnx", show_default=True,
              help="onnx, onnxruntime, openvino, tensorrt or all (comma-separated for several).")
@click.option("--precision", default=None, help="fp32, fp16, int8 (comma-separated); default by target.")
@click.option("--weights", default=None, help="Checkpoint file/dir (timm, transformers, Google .npz, vit-deploy) or hub name.")
@click.option("--num-classes", type=int, default=None,
              help="0: the pooled embedding, no head. Default: the weights' head (none: embedding), else the model's.")
@click.option("--img-size", type=int, default=None, help="Default: from the weights, else 224.")
@click.option("--opset", type=int, default=17, show_default=True)
@click.option("--max-batch", type=int, default=32, show_default=True)
@click.option("--out", default="models", show_default=True, help="The bundle goes to OUT/MODEL/.")
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim.")
@click.option("--calib-dir", default=None, help="Calibration images (default: the shipped photos).")
@click.option("--calib-size", type=int, default=32, show_default=True)
@click.option("--method", "calib_method", type=click.Choice(["mse", "minmax", "entropy", "percentile"]), default="mse",
              show_default=True, help="Calibration method for INT8.")
@_overflow_fix_option
@_engine_options
@click.option("--no-check", is_flag=True, help="Skip the parity check at the end.")
@click.option("--force", is_flag=True, help="Rebuild every stage even when its inputs are unchanged.")
@click.option("--quiet", is_flag=True, help="Only warnings and errors.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON at the end.")
@_handle_errors
def export(model_name, model_args, target, precision, weights, num_classes, img_size, opset, max_batch, out, no_simplify,
           calib_dir, calib_size, calib_method, overflow_fix, device, opt_batch, workspace_mb, dla_core, no_check, force,
           quiet, as_json):
    """Checkpoint -> ONNX -> [INT8] -> engines -> parity check, into one bundle."""
    _setup_logging(quiet or as_json)
    from .pipeline import export as run_export
    manifest = run_export(model=model_name, target=target, precision=precision, weights=weights,
                          num_classes=num_classes, img_size=img_size, opset=opset, max_batch=max_batch, out=out,
                          simplify=not no_simplify, calib_dir=calib_dir, calib_size=calib_size,
                          calib_method=calib_method, overflow_fix=overflow_fix, device=device, opt_batch=opt_batch,
                          workspace_mb=workspace_mb, dla_core=dla_core, check=not no_check, force=force, quiet=quiet or as_json,
                          model_args=_key_values(model_args, "--model-arg"))
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
    elif not quiet:
        from .info import format_summary
        from .sources import bundle_name
        click.echo(format_summary(manifest, out_dir=f"{out}/{bundle_name(model_name)}"))
    if manifest.get("parity") and not manifest["parity"]["passed"]:
        sys.exit(1)


@cli.command()
@click.argument("model_path", type=click.Path(dir_okay=False))
@click.option("--calib-dir", default=None, help="Calibration images (default: the shipped photos).")
@click.option("--calib-size", type=int, default=32, show_default=True)
@click.option("--method", type=click.Choice(["mse", "minmax", "entropy", "percentile"]), default="mse", show_default=True,
              help="Activation clipping: least squared quantization error (mse), max, KL divergence or 99.99th percentile.")
@click.option("--smooth", default="auto", show_default=True,
              help="Outlier migration (SmoothQuant: into the LayerNorm, or a Mul where none precedes the Linear) "
                   "strength 0..1, or auto: per tensor, the strength (or none) that errs least on the calibration "
                   "images.")
@click.option("--no-smooth", is_flag=True, help="No outlier migration.")
@click.option("--no-bias-correction", is_flag=True, help="Keep the biases as they are.")
@click.option("--exclude", multiple=True, help="Keep nodes matching this glob in float (repeatable).")
@click.option("--attention/--no-attention", default=True, show_default=True,
              help="Quantize the attention MatMuls (activation x activation) too. ONNX Runtime's compiled "
                   "artifact runs them in float either way (faster there).")
@click.option("--scheme", type=click.Choice(["symmetric", "asymmetric"]), default="symmetric", show_default=True,
              help="Activations: symmetric int8 (every runtime, TensorRT included) or asymmetric uint8 (CPU runtimes only).")
@click.option("--max-drop", type=float, default=None, help="Return layers to float until top-1 agreement >= 1 - X.")
@click.option("--recipe", type=click.Choice(["auto", "smoothquant", "plain"]), default="auto", show_default=True,
              help="smoothquant: the options above (clipping, migration, attention). plain: full ranges, centred "
                   "activations, Linears only, the image-reading layer in float. auto: builds both, keeps the one "
                   "whose outputs correlate best with FP32 on held-out calibration images.")
@click.option("--min-correlation", type=float, default=0.995, show_default=True,
              help="auto recipe: where the chosen file's worst held-out image correlates with FP32 below this, "
                   "return the transformer blocks whose float gains most to float until it does (at most half of "
                   "them). 0: off.")
@_overflow_fix_option
@click.option("--weight-rounding", type=click.Choice(["gptq", "nearest"]), default="gptq", show_default=True,
              help="gptq: each Linear's rounding error carried onto its other input rows, weighted by the "
                   "calibration activations (same file format and speed; nearest for models over 2 GB).")
@click.option("--img-size", type=int, default=None, help="For ONNX files without vit-deploy metadata.")
@click.option("--mean", default=None, help="r,g,b (for ONNX files without vit-deploy metadata).")
@click.option("--std", default=None, help="r,g,b (for ONNX files without vit-deploy metadata).")
@click.option("--preset", type=click.Choice(["imagenet", "inception", "clip"]), default=None,
              help="Named mean/std for ONNX files without vit-deploy metadata or preprocessor_config.json.")
@click.option("--out", default=None, help="Default: MODEL.int8.onnx beside the input.")
@click.option("--target", default=None,
              help="Also build runtime artifacts beside OUT (as `vit-deploy compile OUT` does): onnxruntime, "
                   "openvino, tensorrt, comma-separated, or all.")
@click.option("--report", is_flag=True, help="Print the per-layer table.")
@_handle_errors
def quantize(model_path, calib_dir, calib_size, method, smooth, no_smooth, no_bias_correction, exclude, attention, scheme,
             max_drop, recipe, min_correlation, overflow_fix, weight_rounding, img_size, mean, std, preset, out, target,
             report):
    """Any ViT ONNX model -> INT8 Q/DQ ONNX from calibration images."""
    _setup_logging(False)
    from .images import default_calibration_dir
    from .quantize import format_report, quantize as run_quantize
    triple = lambda v, name: _triple(v, name)  # noqa: E731
    if target:  # a wrong runtime name stops the run before the calibration, not after
        from .backends import require_runtimes
        from .targets import plan_targets, wants_all
        require_runtimes(plan_targets(target, None)[0], skip_missing=wants_all(target))
    result = run_quantize(model_path, calib_dir or default_calibration_dir(), out, method=method, exclude=exclude,
                          calib_size=calib_size, max_drop=max_drop, img_size=img_size, mean=triple(mean, "--mean"),
                          std=triple(std, "--std"), preset=preset, attention=attention, report=report, scheme=scheme,
                          overflow_fix=overflow_fix, smooth=None if no_smooth else _smooth(smooth),
                          bias_correction=not no_bias_correction, recipe=recipe, weight_rounding=weight_rounding,
                          min_correlation=min_correlation)
    if report:
        click.echo(format_report(result.report))
    click.echo(f"preprocessing from {result.preprocessing_source}: {result.preprocessing['img_size']} px, "
               f"mean {result.preprocessing['mean']}, std {result.preprocessing['std']}")
    if result.recipe_scores:
        click.echo(f"recipe {result.recipe}: output correlation with FP32, worst / mean: " + ", ".join(
            f"{k} {v['worst']:.5f} / {v['mean']:.5f}" for k, v in result.recipe_scores.items()))
    if result.guarded:
        click.echo(f"fidelity guard: {len(result.guarded)} matrix product(s) returned to float; written file's worst / "
                   f"mean correlation {result.fidelity['worst']:.5f} / {result.fidelity['mean']:.5f}")
    click.echo(f"outliers migrated at {result.smoothed_layernorms} LayerNorm(s) and {result.smoothed_products} other "
               f"Linear input(s), {result.bias_corrected} bias(es) corrected, {result.gptq_weights} weight(s) rounded "
               "by GPTQ")
    click.echo(f"wrote {result.path}: {len(result.quantized)} matrix products in INT8, {len(result.excluded)} in float"
               + (f", top-1 agreement {result.agreement:.4f}" if result.agreement is not None else ""))
    if target:
        from .compile import compile_file
        for path in compile_file(result.path, target=target):
            click.echo(f"wrote {path}")
    else:
        click.echo(f"runtime artifacts (ONNX Runtime's INT8 kernels, OpenVINO's INT8 form): "
                   f"vit-deploy compile {result.path} --target onnxruntime,openvino")


def _key_values(pairs, name) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{name} takes KEY=VALUE, got '{pair}'")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def _smooth(value: str):
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise UserError(f"--smooth takes 'auto' or a number between 0 and 1, got '{value}'") from None


def _triple(value, name):
    if value is None:
        return None
    try:
        t = tuple(float(x) for x in value.split(","))
    except ValueError:
        t = ()
    if len(t) != 3:
        raise UserError(f"{name} takes three comma-separated numbers, got '{value}'")
    return t


@cli.command(name="compile")
@click.argument("bundle", type=click.Path())
@click.option("--target", default="all", show_default=True)
@click.option("--precision", default=None)
@_engine_options
@click.option("--force", is_flag=True)
@_handle_errors
def compile_cmd(bundle, target, precision, device, opt_batch, workspace_mb, dla_core, force):
    """Build runtime artifacts for a bundle that already holds its ONNX files, or beside one
    ONNX file (another tool's export, or quantize's INT8 output: NAME.ort.onnx, NAME.xml, NAME.engine)."""
    _setup_logging(False)
    if bundle.endswith(".onnx"):
        from .compile import compile_file
        if precision is not None:
            raise UserError("--precision is the file's own for an ONNX file (INT8 when it is quantized)")
        for path in compile_file(bundle, target=target, device=device, opt_batch=opt_batch,
                                 workspace_mb=workspace_mb, dla_core=dla_core):
            click.echo(f"wrote {path}")
        return
    from .compile import compile_bundle
    from .info import format_summary
    manifest = compile_bundle(bundle, target=target, precision=precision, device=device, force=force,
                              opt_batch=opt_batch, workspace_mb=workspace_mb, dla_core=dla_core)
    click.echo(format_summary(manifest, out_dir=bundle))


def _signature_option(fn):
    """--require-signature PUB.pem (or VIT_DEPLOY_REQUIRE_SIGNATURE for a fleet): every bundle
    the command opens must be signed by that key and unchanged since; it is not written to."""
    @functools.wraps(fn)
    def wrapper(*args, require_signature=None, **kwargs):
        from .bundle import signature_required
        with signature_required(require_signature):
            return fn(*args, **kwargs)
    return click.option("--require-signature", metavar="PUB.pem", envvar="VIT_DEPLOY_REQUIRE_SIGNATURE",
                        default=None, help="Refuse a bundle unless `vit-deploy verify --key PUB.pem` passes "
                        "(env VIT_DEPLOY_REQUIRE_SIGNATURE); results are then not recorded in it.")(wrapper)


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--images", default=None, help="More images to check on.")
@click.option("--labels-dir", default=None, help="Labeled images: one folder per class, or a CSV of file,label.")
@click.option("--backends", default=None, callback=_csv, help="Only these backends (comma-separated).")
@click.option("--weights", default=None, help="The weights the bundle was built from, if they moved.")
@click.option("--max-images", type=int, default=64, show_default=True)
@click.option("--threads", type=int, default=None)
@click.option("--json", "json_out", default=None, help="Write the report as JSON.")
@click.option("--markdown", default=None, help="Write the table as markdown.")
@click.option("--junit", default=None, help="Write JUnit XML for CI.")
@click.option("--save-golden", default=None, help="Store inputs and reference logits in FILE (.npz).")
@click.option("--golden", default=None, help="Compare with a golden FILE instead of PyTorch.")
@click.option("--set", "overrides", multiple=True, help="Override a threshold: PRECISION.METRIC=VALUE, e.g. int8.min_cosine=0.98")
@click.option("--store", is_flag=True, help="Keep the --set thresholds in the bundle for later checks.")
@_signature_option
@_handle_errors
def check(bundle, images, labels_dir, backends, weights, max_images, threads, json_out, markdown, junit,
          save_golden, golden, overrides, store):
    """Compare every artifact of BUNDLE with the PyTorch reference (or golden outputs)."""
    _setup_logging(False)
    from .errors import CheckFailed
    from .parity import check as run_check, format_table
    thresholds = {}
    for o in overrides:
        try:
            key, value = o.split("=")
            prec, metric = key.split(".")
            thresholds.setdefault(prec, {})[metric] = float(value)
        except ValueError:
            raise UserError(f"--set takes PRECISION.METRIC=VALUE, got '{o}'") from None
    from .parity import THRESHOLDS
    for prec, metrics in thresholds.items():
        for metric in metrics:
            if prec not in THRESHOLDS or metric not in ("max_abs", "min_cosine", "top1_agreement"):
                raise UserError(f"--set: unknown threshold '{prec}.{metric}' (precisions fp32, fp16, int8; "
                                f"metrics max_abs, min_cosine, top1_agreement)")
    from .bundle import required_signature_key
    signed = required_signature_key() is not None  # a signed bundle stays as it was signed
    if store and signed:
        raise UserError("--store would change a signed bundle (and break its signature); "
                        "store thresholds before signing")
    if store:
        from .bundle import Bundle
        with Bundle.writing(bundle) as tx:
            for prec, metrics in thresholds.items():
                tx.manifest.setdefault("thresholds", {}).setdefault(prec, {}).update(metrics)
            tx.commit()
    try:
        report = run_check(bundle, images=images, labels_dir=labels_dir, backends=backends, json_out=json_out,
                           markdown=markdown, junit=junit, save_golden_to=save_golden, golden=golden,
                           thresholds=thresholds, weights=weights, max_images=max_images, threads=threads,
                           record=not signed)
    except CheckFailed as e:
        if getattr(e, "report", None):
            click.echo(format_table(e.report))
        raise
    click.echo(format_table(report))


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--backends", default=None, callback=_csv, help="Only these backends (torch, onnx, onnxruntime, openvino, tensorrt).")
@click.option("--precisions", default=None, callback=_csv, help="Only these precisions.")
@click.option("--batch", "batches", default="1", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--threads", type=int, default=None, help="Threads per runtime (default: the runtime's own).")
@click.option("--warmup", type=int, default=5, show_default=True)
@click.option("--iters", type=int, default=None, help="Timed calls per artifact (default 20).")
@click.option("--duration", type=float, default=None, help="Or: seconds of timed round-robin per batch size.")
@click.option("--no-torch", is_flag=True, help="Leave out the PyTorch eager reference.")
@click.option("--device-info", "show_device", is_flag=True, help="Print CPU, ISA flags, GPU and runtime versions.")
@click.option("--json", "json_out", default=None)
@click.option("--csv", "csv_out", default=None)
@click.option("--markdown", default=None)
@click.option("--plot", "plot_out", default=None, help="PNG with p50 bars and p90 whiskers.")
@_signature_option
@_handle_errors
def bench(bundle, backends, precisions, batches, threads, warmup, iters, duration, no_torch, show_device,
          json_out, csv_out, markdown, plot_out):
    """Latency, throughput and memory of every artifact in BUNDLE, measured interleaved."""
    import os
    # torch's OpenMP threads busy-wait after each call and slow the next runtime in
    # the round-robin; passive waiting keeps the comparison fair (set before torch loads).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _setup_logging(False)
    from . import bench as b
    from .atomic import atomic_path, write_json
    from .bundle import required_signature_key
    try:
        sizes = tuple(int(x) for x in batches.split(","))
    except ValueError:
        raise UserError(f"--batch takes comma-separated integers, got '{batches}'") from None
    report = b.bench(bundle, backends=backends, precisions=precisions, batches=sizes, threads=threads,
                     warmup=warmup, iters=iters, duration=duration, include_torch=not no_torch,
                     record=required_signature_key() is None)
    click.echo(b.format_table(report))
    if show_device:
        click.echo(json.dumps(report["device"], indent=2))
    if json_out:
        write_json(json_out, report)
    for path, text in ((csv_out, lambda: b.to_csv(report)), (markdown, lambda: b.format_table(report, True) + "\n")):
        if path:
            with atomic_path(path) as tmp:
                tmp.write_text(text())
    if plot_out:
        b.plot(report, plot_out)


@cli.command()
@click.argument("target", type=click.Path())
@click.argument("images", nargs=-1, required=True)
@click.option("--backend", default=None, help="Artifact to use, e.g. openvino-int8 or onnxruntime.")
@click.option("--top", type=int, default=5, show_default=True)
@click.option("--out", "embeddings_out", default="embeddings.npy", show_default=True,
              help="Embedding bundles: where the embeddings go (.npy, one row per image).")
@click.option("--threads", type=int, default=None)
@click.option("--json", "as_json", is_flag=True)
@_signature_option
@_handle_errors
def predict(target, images, backend, top, embeddings_out, threads, as_json):
    """Top classes for IMAGES with a bundle (or one artifact inside it); an embedding bundle's
    embeddings are written to --out."""
    _setup_logging(False)
    from .predict import predict as run_predict
    results = run_predict(target, images, backend=backend, top=top, threads=threads, embeddings_out=embeddings_out)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for r in results:
        click.echo(f"{r['image']}  ({r['artifact']})")
        if "embedding" in r:
            e = r["embedding"]
            click.echo(f"  embedding {e['shape']}, L2 norm {e['norm']:.4f} -> {e['file']} row {e['row']}")
            continue
        for t in r["top"]:
            click.echo(f"  {t['probability']:7.2%}  {t['name']}  [{t['class']}]")


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="The manifest itself.")
@_handle_errors
def info(bundle, as_json):
    """A readable summary of a bundle: model, preprocessing, artifacts (sha256 checked), parity, latency."""
    from .bundle import Bundle
    from .info import info as summary
    if as_json:
        click.echo(json.dumps(Bundle.open(bundle).manifest, indent=2))
    else:
        click.echo(summary(bundle))


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--key", required=True, metavar="KEY.pem", help="EC private key (PEM), e.g. from `openssl ecparam`.")
@click.option("--signature", default=None, help="Where to write it (default: BUNDLE/bundle.sig, travelling with it).")
@click.option("--password-env", default=None, metavar="VAR", help="Environment variable holding the key's password.")
@_handle_errors
def sign(bundle, key, signature, password_env):
    """Sign every file of BUNDLE, manifest included (OpenSSF model signing; the `sign` extra)."""
    import os
    from .signing import sign_bundle
    password = os.environ.get(password_env) if password_env else None
    if password_env and password is None:
        raise UserError(f"--password-env: environment variable {password_env} is not set")
    click.echo(f"signed {bundle}: {sign_bundle(bundle, key, signature, password)}")


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--key", required=True, metavar="PUB.pem", help="The public key of the signer (PEM).")
@click.option("--signature", default=None, help="Default: BUNDLE/bundle.sig.")
@_handle_errors
def verify(bundle, key, signature):
    """Check that every file of BUNDLE is as signed with KEY's pair: exit 2 naming what changed or was added."""
    from .bundle import Bundle
    from .signing import verify_bundle
    count = verify_bundle(bundle, key, signature)
    Bundle.open(bundle)  # and that what was signed is a sound bundle
    click.echo(f"{bundle}: signature ok, {count} files as signed")


def main():
    try:
        cli.main(prog_name="vit-deploy", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:
        # one line instead of click's usage block
        hint = f" (see vit-deploy {e.ctx.command_path.split(' ', 1)[1]} --help)" if e.ctx and " " in e.ctx.command_path else ""
        click.echo(f"error: {e.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
