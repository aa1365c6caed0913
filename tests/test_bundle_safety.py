"""A bundle from elsewhere is untrusted input (issue 14): every path it names stays
inside it, its manifest is validated against one schema, and a few hundred random
manifest mutations never give a traceback nor open a file outside the bundle."""
import copy
import json
import os
import random
import shutil
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import assert_one_line_error, run_cli

IMAGE = Path(__file__).resolve().parent.parent / "vit_deploy" / "data" / "calibration" / "astronaut_center.jpg"
_TINY: dict = {}
_TINY_LOCK = threading.Lock()


def tiny_bundle_source(tmp_path_factory) -> Path:
    """vit-ti16 at 32 px, ONNX Runtime FP32 + INT8, built once per test session (shared
    with test_signing.py); tests work on copies (see copy_tiny)."""
    with _TINY_LOCK:
        if "dir" not in _TINY:
            from vit_deploy.pipeline import export
            out = tmp_path_factory.mktemp("tiny")
            export(model="vit-ti16", img_size=32, num_classes=10, target="onnxruntime", precision="fp32,int8",
                   out=out, max_batch=4, quiet=True)
            _TINY["dir"] = out / "vit-ti16"
        return _TINY["dir"]


def copy_tiny(src: Path, dst: Path) -> Path:
    """A cheap copy: hard links (a test that changes a file's bytes must replace the file)."""
    shutil.copytree(src, dst, copy_function=os.link, ignore=shutil.ignore_patterns(".*.lock"))
    return dst


def replace_bytes(path: Path, data: bytes) -> None:
    path.unlink()  # break the hard link to the shared source
    path.write_bytes(data)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return tiny_bundle_source(tmp_path_factory)


def invoke(*args, env=None):
    """The real CLI in this process: (exit code, stdout, stderr, unexpected exception or None)."""
    from vit_deploy.cli import cli
    result = CliRunner().invoke(cli, [str(a) for a in args], env=env)
    exc = result.exception if result.exception and not isinstance(result.exception, SystemExit) else None
    return result.exit_code, result.stdout, result.stderr, exc


@pytest.fixture(autouse=True)
def _quiet_log(monkeypatch):
    # the CLI adds a stderr handler once; CliRunner swaps stderr per call, so give it one of ours
    import logging
    log = logging.getLogger("vit_deploy")
    monkeypatch.setattr(log, "handlers", [logging.NullHandler()])


def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def _write_manifest(d: Path, m: dict) -> None:
    replace_bytes(d / "manifest.json", json.dumps(m).encode())


def _escape(kind: str, d: Path) -> str:
    """Point the onnxruntime-int8 artifact (what predict picks first) at a file outside
    the bundle with the same bytes, so its sha256 matches. Returns the offending path."""
    outside = d.parent / "outside.onnx"
    shutil.copy(d / "model.int8.ort.onnx", outside)
    if kind == "symlink":
        (d / "model.int8.ort.onnx").unlink()
        (d / "model.int8.ort.onnx").symlink_to(outside)
        return "model.int8.ort.onnx"
    rel = "../outside.onnx" if kind == "dotdot" else str(outside)
    m = _manifest(d)
    art = next(a for a in m["artifacts"] if (a["backend"], a["precision"]) == ("onnxruntime", "int8"))
    digest = art["sha256"]
    art.update(path=rel, files={rel: digest}, sha256=digest)
    _write_manifest(d, m)
    return rel


COMMANDS = {
    "predict": lambda d: ["predict", d, IMAGE],
    "check": lambda d: ["check", d],
    "bench": lambda d: ["bench", d, "--no-torch", "--iters", "1", "--warmup", "0"],
    "info": lambda d: ["info", d],
    "compile": lambda d: ["compile", d, "--target", "onnxruntime"],
}


@pytest.mark.parametrize("kind", ["dotdot", "symlink", "absolute"])
def test_escapes_are_refused_by_every_command(tiny, tmp_path, kind):
    """The two escapes of the issue and an absolute path: exit 2, one line naming the path,
    from every command that opens a bundle, and the outside file is never opened."""
    d = copy_tiny(tiny, tmp_path / "b" / "vit-ti16")
    named = _escape(kind, d)
    for name, args in COMMANDS.items():
        code, out, err, exc = invoke(*args(d))
        assert exc is None, f"{name}: {exc!r}"
        line = assert_one_line_error(code, err, named)
        assert "outside" in line or "absolute" in line or ".." in line, line
    # export into the existing bundle refuses it too, before any work
    code, out, err, exc = invoke("export", "--model", "vit-ti16", "--img-size", "32", "--num-classes", "10",
                                 "--target", "onnxruntime", "--precision", "fp32", "--out", d.parent, "--no-check")
    assert exc is None, repr(exc)
    assert_one_line_error(code, err, named)


def test_escape_refused_through_the_console_entry(tiny, tmp_path):
    """The same through the installed console entry in a subprocess: exit 2, one line."""
    d = copy_tiny(tiny, tmp_path / "b" / "vit-ti16")
    named = _escape("dotdot", d)
    code, out, err = run_cli("predict", d, IMAGE)
    assert_one_line_error(code, err, named, "leaves the bundle")


def test_inside_symlink_and_plain_bundle_still_work(tiny, tmp_path):
    """What must keep working: an untouched copy, and a symlink that stays inside the bundle."""
    d = copy_tiny(tiny, tmp_path / "b" / "vit-ti16")
    code, out, err, exc = invoke("predict", d, IMAGE, "--backend", "onnxruntime-int8")
    assert (code, exc) == (0, None), err
    (d / "alias.onnx").symlink_to("model.int8.ort.onnx")
    m = _manifest(d)
    art = next(a for a in m["artifacts"] if (a["backend"], a["precision"]) == ("onnxruntime", "int8"))
    art.update(path="alias.onnx", files={"alias.onnx": art["sha256"]})
    _write_manifest(d, m)
    code, out, err, exc = invoke("predict", d, IMAGE, "--backend", "onnxruntime-int8")
    assert (code, exc) == (0, None), err
    code, out, err, exc = invoke("info", d)
    assert code == 0 and "sha256 ok" in out, err


def test_openvino_weights_are_covered(tiny, tmp_path):
    """An OpenVINO artifact must list its .bin (OpenVINO opens it by name beside the .xml),
    and a .bin that links out of the bundle is refused like any other file."""
    from vit_deploy.manifest_schema import Invalid, validate
    d = copy_tiny(tiny, tmp_path / "b" / "vit-ti16")
    m = _manifest(d)
    (d / "openvino").mkdir()
    (d / "openvino" / "model.fp32.xml").write_text("<net/>")
    outside = tmp_path / "b" / "secret.bin"
    outside.write_bytes(b"\0" * 64)
    (d / "openvino" / "model.fp32.bin").symlink_to(outside)
    from vit_deploy.bundle import sha256_file
    xml, binf = "openvino/model.fp32.xml", "openvino/model.fp32.bin"
    ov = {"backend": "openvino", "precision": "fp32", "path": xml, "sha256": sha256_file(d / xml),
          "files": {xml: sha256_file(d / xml)}}
    with pytest.raises(Invalid, match=r"artifacts\[4\]\.files.*model\.fp32\.bin"):
        validate({**m, "artifacts": m["artifacts"] + [ov]})
    ov["files"][binf] = sha256_file(outside)
    _write_manifest(d, {**m, "artifacts": m["artifacts"] + [ov]})
    code, out, err, exc = invoke("info", d)
    assert exc is None
    assert_one_line_error(code, err, binf, "outside the bundle")


def _external_copy(d: Path, location: str, data_at: Path, listed: bool) -> None:
    """Re-save the bundle's onnx-fp32 model with its weights in an external file named
    `location`, the data itself placed at `data_at`; update the manifest to match."""
    import onnx
    from vit_deploy.bundle import sha256_file
    model = onnx.load(str(d / "model.onnx"))
    tmp = d.parent / "ext"
    tmp.mkdir(exist_ok=True)
    onnx.save_model(model, str(tmp / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w.data", size_threshold=1024)
    ext_model = onnx.load(str(tmp / "model.onnx"), load_external_data=False)
    for t in ext_model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    (d / "model.onnx").unlink()
    onnx.save(ext_model, str(d / "model.onnx"))
    data_at.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp / "w.data", data_at)
    m = _manifest(d)
    art = next(a for a in m["artifacts"] if (a["backend"], a["precision"]) == ("onnx", "fp32"))
    files = {"model.onnx": sha256_file(d / "model.onnx")}
    if listed:
        files[location] = sha256_file(data_at)
    art.update(files=files, sha256=files["model.onnx"])
    _write_manifest(d, m)


@pytest.mark.parametrize("case", ["listed", "unlisted", "dotdot"])
def test_onnx_external_data_stays_inside_and_checked(tiny, tmp_path, case):
    """External data named inside an ONNX file: run when it is a checked file of the
    artifact; refused, naming the location, when it is unlisted or leaves the bundle."""
    d = copy_tiny(tiny, tmp_path / "b" / "vit-ti16")
    location = {"listed": "model.onnx.data", "unlisted": "model.onnx.data", "dotdot": "../outside.data"}[case]
    _external_copy(d, location, (d / location).resolve() if case != "dotdot" else tmp_path / "b" / "outside.data",
                   listed=case == "listed")
    code, out, err, exc = invoke("predict", d, IMAGE, "--backend", "onnx-fp32")
    assert exc is None, repr(exc)
    if case == "listed":
        assert code == 0, err
    else:
        assert_one_line_error(code, err, location, "external data")


def test_journal_from_elsewhere_is_not_acted_on(tiny, tmp_path):
    """A crafted .journal.json cannot make a reader rename files outside the bundle."""
    d = copy_tiny(tiny, tmp_path / "b" / "vit-ti16")
    victim = tmp_path / "b" / "victim.txt"
    victim.write_text("keep me")
    (d / ".journal.json").write_text(json.dumps({"renames": [["../victim.txt", "stolen.txt"]]}))
    code, out, err, exc = invoke("info", d)
    assert exc is None
    assert_one_line_error(code, err, ".journal.json")
    assert victim.read_text() == "keep me" and not (d / "stolen.txt").exists()


def test_links_where_the_manifest_or_a_lock_belongs(tiny, tmp_path):
    d = copy_tiny(tiny, tmp_path / "b" / "vit-ti16")
    outside = tmp_path / "b" / "outside.txt"
    outside.write_text("x")
    (d / ".commit.lock").symlink_to(outside)
    code, out, err, exc = invoke("info", d)
    assert_one_line_error(code, err, ".commit.lock", "symlink")
    (d / ".commit.lock").unlink()
    shutil.copy(d / "manifest.json", tmp_path / "b" / "real.json")
    (d / "manifest.json").unlink()
    (d / "manifest.json").symlink_to(tmp_path / "b" / "real.json")
    code, out, err, exc = invoke("info", d)
    assert_one_line_error(code, err, "manifest.json", "outside the bundle")


def test_read_only_bundle_opens_without_its_lock(tiny, tmp_path, monkeypatch):
    """A bundle on read-only media (no lock file can be made) still opens for reading."""
    import errno
    d = copy_tiny(tiny, tmp_path / "b" / "vit-ti16")
    real_open = os.open

    def read_only(path, flags, *a, **k):
        if str(path).endswith(".lock") and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *a, **k)
    monkeypatch.setattr(os, "open", read_only)
    from vit_deploy.bundle import Bundle
    assert Bundle.open(d).manifest["model"]["name"] == "vit-ti16"
    assert not (d / ".commit.lock").exists()


# ------------------------------------------------------------------ the schema

def test_schema_names_the_field(tiny):
    from vit_deploy.manifest_schema import Invalid, validate
    m = _manifest(tiny)
    validate(m)
    cases = [
        (lambda m: m["model"].pop("img_size"), r"^model\.img_size: is missing"),
        (lambda m: m.__setitem__("max_batch", -3), r"^max_batch: must be between 1"),
        (lambda m: m.__setitem__("max_batch", 10**12), r"^max_batch: must be between"),
        (lambda m: m["model"].__setitem__("img_size", "32"), r"^model\.img_size: must be an integer"),
        (lambda m: m["artifacts"][1].__setitem__("backend", "pickle"), r"^artifacts\[1\]\.backend: must be one of"),
        (lambda m: m["artifacts"][0].__setitem__("precision", "int4"), r"^artifacts\[0\]\.precision"),
        (lambda m: m["artifacts"].append(copy.deepcopy(m["artifacts"][0])), r"listed twice"),
        # the INT8 file listed again under another precision (the fuzz test once relabelled it FP32 and
        # `check` exited 1 on the parity failure instead of 2 on the manifest)
        (lambda m: m["artifacts"].append({**copy.deepcopy(next(a for a in m["artifacts"] if a["precision"] == "int8")),
                                          "precision": "fp16"}), r"\.path: '.*' is already artifacts\[\d+\]"),
        (lambda m: m["artifacts"][0].__setitem__("sha256", "0" * 64), r"^artifacts\[0\]\.sha256: differs"),
        (lambda m: m["preprocessing"].__setitem__("std", [0.5, 0, 0.5]), r"^preprocessing\.std\[1\]"),
        (lambda m: m["model"].__setitem__("labels", ["a", "b"]), r"^model\.labels: has 2 names for 10"),
        (lambda m: m["artifacts"][1]["quantization"]["held_out_images"].append("../../etc/passwd"),
         r"held_out_images\[\d+\]: must be a plain file name"),
    ]
    for change, pattern in cases:
        bad = copy.deepcopy(m)
        change(bad)
        with pytest.raises(Invalid, match=pattern):
            validate(bad)


def test_schema_knows_every_backend_with_artifacts():
    from vit_deploy.backends import MODULES
    from vit_deploy.manifest_schema import ARTIFACT_BACKENDS
    assert set(ARTIFACT_BACKENDS) == set(MODULES) - {"torch"}


def test_schema_error_is_one_line_from_the_cli(tiny, tmp_path):
    d = copy_tiny(tiny, tmp_path / "b" / "vit-ti16")
    m = _manifest(d)
    m["preprocessing"]["mean"] = "grey"
    _write_manifest(d, m)
    code, out, err = run_cli("info", d)
    assert_one_line_error(code, err, "preprocessing.mean", "must be a list")


# ------------------------------------------------------------------ the fuzz test

class OpenAudit:
    """Records every path this process opens (Python's 'open' audit event, which covers
    open(), io.open and os.open) and every model path handed to ONNX Runtime (which
    opens files in C++, beyond the audit hook)."""

    def __init__(self):
        self.active = False
        self.paths: list[str] = []
        self.made: list[Path] = []  # temporary files and folders the commands create for themselves
        sys.addaudithook(self._hook)  # cannot be removed: it records only while active

    def clear(self):
        self.paths.clear()
        self.made.clear()

    def _hook(self, event, args):
        if not self.active:
            return
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            self.paths.append(os.fsdecode(args[0]))
        elif event in ("tempfile.mkdtemp", "tempfile.mkstemp"):
            self.made.append(Path(os.fsdecode(args[0])).resolve())

    def outside(self, bundle: Path, allowed_files: list[Path]) -> list[str]:
        """Opened paths that are neither in the bundle, nor given inputs, nor code or
        system files the interpreter itself reads."""
        root = bundle.resolve()
        allowed = {p.resolve() for p in allowed_files}
        system = [Path(p).resolve() for p in {sys.prefix, sys.base_prefix, sys.exec_prefix}] + \
                 [Path(__file__).resolve().parent.parent / "vit_deploy", Path("/proc"), Path("/sys"), Path("/usr"),
                  Path("/dev/null"), Path("/dev/urandom")] + self.made
        bad = []
        for p in self.paths:
            if p.endswith(".__path_hook__"):  # importlib's editable-install finder, not a file
                continue
            real = Path(os.path.abspath(p)).resolve()
            if real.is_relative_to(root) or real in allowed or any(real.is_relative_to(s) for s in system):
                continue
            bad.append(p)
        return bad


_AUDIT: list = []


def _audit() -> OpenAudit:
    if not _AUDIT:
        _AUDIT.append(OpenAudit())
    return _AUDIT[0]


NASTY_NUMBERS = [-1, -(10**9), 0, 10**18, 2**63, 1e308, -1e-300, float("inf"), float("-inf"), float("nan")]
NASTY_VALUES = [None, True, "", "x" * 5, 7, -7, 2.5, [], {}, [1, 2], {"a": 1}, "../x", "/etc/passwd"]


def _slots(node, trail=()):
    """Every (container, key) in a JSON tree."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield node, k, trail + (k,)
        yield from _slots(v, trail + (k,))


def mutate(manifest: dict, rng: random.Random, bait: dict) -> tuple[dict, str]:
    """One to three random changes of the kinds the issue names; returns (manifest, what)."""
    m = copy.deepcopy(manifest)
    done = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        kind = rng.choice(["delete", "retype", "number", "path", "path", "duplicate"])
        slots = list(_slots(m))
        if kind == "delete" and slots:
            parent, key, trail = rng.choice(slots)
            if isinstance(parent, dict):
                del parent[key]
            else:
                parent.pop(key)
        elif kind == "retype" and slots:
            parent, key, trail = rng.choice(slots)
            parent[key] = copy.deepcopy(rng.choice(NASTY_VALUES))
        elif kind == "number":
            nums = [(p, k, t) for p, k, t in slots if isinstance(p[k], (int, float)) and not isinstance(p[k], bool)]
            if not nums:
                continue
            parent, key, trail = rng.choice(nums)
            parent[key] = rng.choice(NASTY_NUMBERS)
        elif kind == "path":
            arts = [a for a in m.get("artifacts", []) if isinstance(a, dict)] if isinstance(m.get("artifacts"), list) else []
            if not arts:
                continue
            a = rng.choice(arts)
            target, digest = rng.choice(bait["targets"])
            trail = ("artifacts", "path", target)
            where = rng.choice(["all", "all", "path", "files"])
            if where in ("all", "path"):
                a["path"] = target
            if where in ("all", "files"):
                a["files"] = {target: digest} if where == "all" else {**(a.get("files") or {}), target: digest}
            if where == "all":
                a["sha256"] = digest
        elif kind == "duplicate":
            arts = m.get("artifacts")
            if not isinstance(arts, list) or not arts:
                continue
            twin = copy.deepcopy(rng.choice(arts))
            if isinstance(twin, dict) and rng.random() < 0.5:
                twin["precision"] = rng.choice(["fp32", "fp16", "int8"])
            arts.append(twin)
            trail = ("artifacts", "duplicate")
        else:
            continue
        done.append(f"{kind} {'.'.join(map(str, trail))}")
    return m, "; ".join(done) or "none"


def _deletions(manifest: dict):
    """Every object key of the manifest deleted in turn: each field the code may read."""
    for n, (parent, key, trail) in enumerate(_slots(manifest)):
        if isinstance(parent, dict):
            m = copy.deepcopy(manifest)
            target = m
            for k in trail[:-1]:
                target = target[k]
            del target[key]
            yield m, "delete " + ".".join(map(str, trail))


def test_fuzzed_manifests_never_crash_nor_read_outside(tiny, tmp_path, monkeypatch):
    """Every key deleted in turn, then 300 seeded random mutations of a valid manifest,
    through info and predict (and, every tenth random one, check --golden, bench and
    compile): each ends with exit 0 or 2, never a traceback, and no file outside the
    bundle is opened (audited, not assumed)."""
    import onnxruntime as ort

    from vit_deploy.bundle import sha256_file
    from vit_deploy.parity import save_golden

    work = tmp_path / "fz"
    src = copy_tiny(tiny, work / "src")
    # keep the INT8 artifacts only: a smaller bundle to hash per run, the same code paths
    m0 = _manifest(src)
    m0["artifacts"] = [a for a in m0["artifacts"] if a["precision"] == "int8"]
    for f in ("model.onnx", "model.ort.onnx"):
        (src / f).unlink()
    _write_manifest(src, m0)
    # bait: files outside the bundle with the bytes (so the sha256) of real artifacts
    outside = work / "outside.onnx"
    shutil.copy(src / "model.int8.ort.onnx", outside)
    digest = sha256_file(outside)
    bait = {"targets": [("../outside.onnx", digest), (str(outside), digest), ("sub/../../outside.onnx", digest),
                        ("/etc/passwd", "0" * 64), ("/dev/zero", "0" * 64), ("./model.int8.onnx", digest),
                        ("model.int8.ort.onnx/..", digest), ("C:/x.onnx", digest), ("a\\..\\..\\outside.onnx", digest),
                        ("model.int8.ort.onnx", digest)]}
    # a tiny golden file: 2 inputs and the INT8 ONNX model's own outputs
    from vit_deploy.images import load_images
    from vit_deploy.zoo import Preprocessing
    x, _ = load_images([IMAGE, IMAGE], Preprocessing.from_dict(m0["preprocessing"]))
    session = ort.InferenceSession(str(src / "model.int8.onnx"))
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    golden = work / "golden.npz"
    save_golden(golden, x, logits, m0, ["a.jpg", "b.jpg"])

    audit = _audit()

    class AuditedSession(ort.InferenceSession):
        def __init__(self, path_or_bytes, *a, **k):
            if audit.active and isinstance(path_or_bytes, (str, os.PathLike)):
                audit.paths.append(os.fspath(path_or_bytes))
            super().__init__(path_or_bytes, *a, **k)
    monkeypatch.setattr(ort, "InferenceSession", AuditedSession)

    rng = random.Random(14)
    bundle = work / "b"
    outcomes = {0: 0, 2: 0}
    runs = 0
    deletions = list(_deletions(m0))
    cases = deletions + [mutate(m0, rng, bait) for _ in range(300)]
    for i, (m, what) in enumerate(cases):
        if bundle.exists():
            shutil.rmtree(bundle)
        copy_tiny(src, bundle)
        replace_bytes(bundle / "manifest.json", json.dumps(m).encode())  # NaN and Infinity included
        commands = [["info", bundle], ["predict", bundle, IMAGE, "--threads", "1"]]
        if i >= len(deletions) and i % 10 == 0:
            commands += [["check", bundle, "--golden", golden, "--threads", "1"],
                         ["bench", bundle, "--no-torch", "--iters", "1", "--warmup", "0", "--threads", "1"],
                         ["compile", bundle, "--target", "onnxruntime", "--precision", "int8"]]
        for args in commands:
            audit.clear()
            audit.active = True
            try:
                code, out, err, exc = invoke(*args)
            finally:
                audit.active = False
            runs += 1
            context = f"mutation {i} ({what}) with {args[0]}"
            assert exc is None, f"{context}: {type(exc).__name__}: {exc}"
            assert "Traceback" not in out + err, f"{context}: {err}"
            assert code in (0, 2), f"{context}: exit {code}: {err}"
            if code == 2:
                assert len([ln for ln in err.strip().splitlines() if ln.startswith("error:")]) == 1, f"{context}: {err}"
            outcomes[code] += 1
            escaped = audit.outside(bundle, [IMAGE, golden])
            assert not escaped, f"{context}: opened outside the bundle: {escaped}"
    print(f"fuzz: {len(deletions)} single-key deletions + 300 random mutations, {runs} command runs, "
          f"exit 0: {outcomes[0]}, exit 2: {outcomes[2]}")
    assert outcomes[0] > 20 and outcomes[2] > 100  # both harmless and refused changes were exercised


def test_no_write_through_a_folder_that_links_out(tiny, tmp_path):
    """compile into a bundle whose `openvino/` folder is a symlink out: refused, nothing written there."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed")
    d = copy_tiny(tiny, tmp_path / "b" / "vit-ti16")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (d / "openvino").symlink_to(elsewhere, target_is_directory=True)
    code, out, err, exc = invoke("compile", d, "--target", "openvino", "--precision", "int8")
    assert exc is None, repr(exc)
    assert_one_line_error(code, err, "openvino", "outside the bundle")
    assert not any(elsewhere.iterdir())
    assert invoke("info", d)[0] == 0  # and the bundle is as it was


def test_artifact_whose_content_is_not_a_model_is_one_line(tiny, tmp_path):
    """The hash matches (the manifest was edited to agree), but the bytes are not a model:
    the runtime's load error becomes one line naming the file, exit 2."""
    from vit_deploy.weights import sha256_file
    d = copy_tiny(tiny, tmp_path / "b")
    m = _manifest(d)
    art = next(a for a in m["artifacts"] if a["backend"] == "onnxruntime" and a["precision"] == "fp32")
    (d / art["path"]).write_bytes(b"this is not an ONNX model\n" * 8)
    digest = sha256_file(d / art["path"])
    art["sha256"] = digest
    art["files"] = {k: (digest if k == art["path"] else v) for k, v in art["files"].items()}
    _write_manifest(d, m)
    code, _, err = run_cli("predict", d, IMAGE, "--backend", "onnxruntime-fp32")
    assert_one_line_error(code, err, art["path"].split("/")[-1], "could not load")
