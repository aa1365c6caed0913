"""The bundle: a directory of artifacts and the manifest.json that every stage
reads and extends.

Writes go through a Transaction: new files are staged in a hidden directory,
then a journal naming every rename is written (the commit point), then the
renames happen and the journal is removed. Whoever opens the bundle next
finishes a journalled commit or discards an unjournalled one, so a process
killed at any moment leaves the bundle as it was or complete. One writer at a
time holds `.write.lock`; a second one is refused with a clear message.

A bundle copied from elsewhere is untrusted input. Opening one validates its
manifest against one schema (manifest_schema.py) and keeps every path it names
inside the bundle directory, symlinks followed; running an artifact re-checks
that, its sha256 and, for ONNX files, where their external data lives. With
`signature_required(PUB.pem)` (the CLI's --require-signature) the bundle's
signature over every file is verified first, before anything in it is read.
"""
from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import shutil
import signal
import uuid
from pathlib import Path

from .atomic import _fsync_dir, write_json
from .errors import UserError
from .manifest_schema import Invalid, bundle_relative, validate

log = logging.getLogger("vit_deploy")
MANIFEST = "manifest.json"
JOURNAL = ".journal.json"
LOCKS = (".write.lock", ".commit.lock")
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 64 << 20
# How an ONNX file names an external data file: TensorProto.external_data entry {key: "location"}.
_ONNX_LOCATION_KEY = b"\x0a\x08location"

_required_key: contextvars.ContextVar[str | None] = contextvars.ContextVar("vit_deploy_signature_key", default=None)


@contextlib.contextmanager
def signature_required(public_key: str | os.PathLike | None):
    """Within this block, every Bundle.open first verifies the bundle's signature
    (signing.py) with `public_key` and refuses an unsigned or changed bundle.
    None leaves bundles unchecked."""
    token = _required_key.set(os.fspath(public_key) if public_key else None)
    try:
        yield
    finally:
        _required_key.reset(token)


def required_signature_key() -> str | None:
    """The public key bundles must be signed with here, if any (see signature_required)."""
    return _required_key.get()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    return _hash_and_scan(Path(path), b"", chunk)[0]


def _hash_and_scan(path: Path, needle: bytes, chunk: int = 1 << 22) -> tuple[str, bool]:
    """sha256 of a file, and whether `needle` occurs in it, in one read."""
    h, found, tail = hashlib.sha256(), False, b""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if needle and not found:
                found = needle in tail + block
                tail = block[-len(needle):]
    return h.hexdigest(), found


def inside(directory: Path, rel, field: str = "path") -> Path:
    """The file that `rel` names in the bundle at `directory`, refused (UserError naming
    it) unless it is a bundle-relative path that, when it exists, resolves (symlinks
    followed) to a regular file inside the bundle. A missing file is left to the caller."""
    try:
        bundle_relative(rel, field)
    except Invalid as e:
        raise UserError(f"{directory / MANIFEST}: {e}") from None
    p = directory / rel
    if os.path.lexists(p):
        try:
            real = p.resolve(strict=True)
            root = directory.resolve(strict=True)
        except (OSError, RuntimeError):  # a symlink loop or a dangling link
            raise UserError(f"{p}: a link that does not resolve; refusing to use it") from None
        if not real.is_relative_to(root):
            raise UserError(f"{p}: resolves to {real}, outside the bundle; refusing to use it")
        if not real.is_file():
            raise UserError(f"{p}: not a regular file; refusing to use it")
    return p


def artifact_files(artifact: dict) -> dict:
    """Bundle-relative file -> sha256 of every file an artifact is made of."""
    return artifact.get("files", {artifact["path"]: artifact["sha256"]})


def _fault(point: str) -> None:
    """Test hook: VIT_DEPLOY_FAULT=<point> kills this process there, as a power cut would."""
    if os.environ.get("VIT_DEPLOY_FAULT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _recover(directory: Path, drop_leftovers: bool) -> None:
    """Finish a journalled commit; with `drop_leftovers` (only when no writer can be
    running) also remove what an unfinished, unjournalled one staged."""
    journal = directory / JOURNAL
    if os.path.lexists(journal):
        inside(directory, JOURNAL)
        try:
            plan = json.loads(journal.read_text())
        except ValueError:  # a torn journal cannot exist (atomic write); be safe anyway
            plan = {"renames": []}
        for src, dst in _journal_renames(directory, plan):
            src_p, dst_p = directory / src, directory / dst
            if src_p.exists():
                dst_p.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src_p, dst_p)
                _fault("mid-rename")
        _fsync_dir(directory)
        journal.unlink()
    if not drop_leftovers:
        return
    for leftover in directory.glob(".staging-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in directory.glob(".*.tmp"):
        leftover.unlink(missing_ok=True)


def _journal_renames(directory: Path, plan) -> list:
    """The journal's renames, each from this bundle's staging directory to a path
    inside the bundle; anything else (a journal from elsewhere) is refused."""
    renames = plan.get("renames") if isinstance(plan, dict) else None
    bad = UserError(f"{directory / JOURNAL}: not a journal of this bundle (names paths outside it); "
                    f"refusing to act on it; delete it if the bundle came from elsewhere")
    if not isinstance(renames, list):
        raise bad
    root = directory.resolve()
    for pair in renames:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
                and pair[0].startswith(".staging-") and "/" in pair[0]):
            raise bad
        for rel in pair:
            try:
                bundle_relative(rel)
            except Invalid:
                raise bad from None
            if not (directory / rel).parent.resolve().is_relative_to(root):
                raise bad
    return renames


@contextlib.contextmanager
def _lock(path: Path, exclusive: bool, blocking: bool = True, optional: bool = False):
    """flock on `path`. `optional`: a reader on a read-only copy of a bundle goes on
    without the lock (nobody can be writing it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"{path}: a symlink where a lock file belongs; refusing to open it") from None
        if not (optional and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM)):
            raise UserError(f"{path}: cannot open the bundle's lock file: {e.strerror}") from None
        fd = None
    if fd is None:
        yield
        return
    try:
        flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, flags)
        except BlockingIOError:
            raise UserError(f"{path.parent}: another vit-deploy process is writing this bundle; "
                            f"wait for it to finish or choose another --out") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


class Bundle:
    def __init__(self, directory: Path, manifest: dict):
        self.dir = Path(directory)
        self.manifest = manifest

    # ----------------------------------------------------------- reading
    @classmethod
    def open(cls, directory: str | os.PathLike) -> "Bundle":
        directory = Path(directory)
        if directory.is_file() and directory.name == MANIFEST:
            directory = directory.parent
        if not (directory / MANIFEST).is_file():
            raise UserError(f"{directory}: not a vit-deploy bundle (no {MANIFEST}); "
                            f"make one with `vit-deploy export`")
        key = required_signature_key()
        if key:  # before anything in the bundle is read or acted on (the journal included)
            from .signing import verify_bundle
            verify_bundle(directory, key)
        manifest_path = inside(directory, MANIFEST)
        with _lock(directory / ".commit.lock", exclusive=True, optional=not os.path.lexists(directory / JOURNAL)):
            _recover(directory, drop_leftovers=False)
            if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
                raise UserError(f"{manifest_path}: over {MAX_MANIFEST_BYTES >> 20} MB, not a vit-deploy manifest")
            try:
                manifest = json.loads(manifest_path.read_text())
            except (ValueError, RecursionError) as e:
                raise UserError(f"{manifest_path}: not valid JSON ({type(e).__name__}: {str(e)[:100]})") from None
        if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{manifest_path}: not a vit-deploy manifest of format {FORMAT_VERSION}")
        try:
            validate(manifest)
        except Invalid as e:
            raise UserError(f"{manifest_path}: {e}") from None
        bundle = cls(directory, manifest)
        for i, a in enumerate(bundle.artifacts):  # every named file stays inside, before any is used
            for rel in [*artifact_files(a), *a.get("extra_files", [])]:
                inside(directory, rel, f"artifacts[{i}]")
        return bundle

    @property
    def artifacts(self) -> list[dict]:
        return self.manifest["artifacts"]

    def find(self, backend: str, precision: str) -> dict | None:
        return next((a for a in self.artifacts if a["backend"] == backend and a["precision"] == precision), None)

    def path(self, artifact: dict) -> Path:
        return inside(self.dir, artifact["path"])

    def verify(self, artifact: dict) -> Path:
        """Check every file of an artifact before it is used: inside the bundle, its
        recorded sha256, and an ONNX file's external data among those checked files."""
        files = artifact_files(artifact)
        for rel, digest in files.items():
            p = inside(self.dir, rel)
            if not p.is_file():
                raise UserError(f"{p}: artifact file is missing; rebuild the bundle with `vit-deploy export --force`")
            is_onnx = rel.endswith(".onnx")
            actual, names_external = _hash_and_scan(p, _ONNX_LOCATION_KEY if is_onnx else b"")
            if actual != digest:
                raise UserError(f"{p}: sha256 does not match the manifest (changed after it was built); "
                                f"refusing to run it; rebuild with `vit-deploy export --force`")
            if names_external:
                _check_external_data(p, rel, files)
        return inside(self.dir, artifact["path"])

    def reusable(self, backend: str, precision: str, key: str, force: bool = False) -> dict | None:
        """The recorded artifact if it was made from the same inputs (`key`) and its
        files are intact; a damaged one is rebuilt, with a warning."""
        old = self.find(backend, precision)
        if old is None or force or old.get("cache_key") != key:
            return None
        try:
            self.verify(old)
        except UserError as e:
            log.warning("rebuilding %s-%s: %s", backend, precision, e)
            return None
        log.info("[%s-%s] reusing %s (same inputs, options and tool versions)", backend, precision, old["path"])
        return old

    # ----------------------------------------------------------- writing
    @classmethod
    @contextlib.contextmanager
    def writing(cls, directory: str | os.PathLike, new_manifest: dict | None = None):
        """Hold the bundle's write lock and yield a Transaction on it."""
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe = directory / f".probe-{uuid.uuid4().hex}.tmp"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise UserError(f"cannot write to output directory {directory}: {e.strerror or e}") from None
        with _lock(directory / ".write.lock", exclusive=True, blocking=False):
            with _lock(directory / ".commit.lock", exclusive=True):
                _recover(directory, drop_leftovers=True)
            if (directory / MANIFEST).is_file():
                manifest = Bundle.open(directory).manifest
            else:
                manifest = new_manifest or {"format_version": FORMAT_VERSION, "artifacts": []}
            tx = Transaction(cls(directory, manifest))
            try:
                yield tx
            finally:
                tx.discard()


def _onnx_tensors(graph):
    """Every tensor of an ONNX graph, subgraphs included (where external data can be named)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _onnx_tensors(attr.g)
            for g in attr.graphs:
                yield from _onnx_tensors(g)


def _check_external_data(path: Path, rel: str, files: dict) -> None:
    """An ONNX file's external data must be files of the same artifact (so inside the
    bundle and sha256-checked), refused before a runtime follows the locations."""
    try:
        import onnx
    except ImportError:  # without onnx, ONNX Runtime's own check (no '..', no absolute path) remains
        return
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - any parse failure of an untrusted file is the user's input
        raise UserError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    base = posixpath.dirname(rel)
    for tensor in _onnx_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        try:
            bundle_relative(location, "location")
        except Invalid:
            raise UserError(f"{path}: external data location {location!r} of tensor {tensor.name!r} "
                            f"leaves the bundle; refusing to run it") from None
        target = posixpath.join(base, location) if base else location
        if target not in files:
            raise UserError(f"{path}: external data {location!r} of tensor {tensor.name!r} is not a file of this "
                            f"artifact in the manifest (so it is not checked); refusing to run it")


class Transaction:
    """Files staged for a bundle and committed together with its manifest."""

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.staging = bundle.dir / f".staging-{uuid.uuid4().hex[:12]}"
        self.staged: list[str] = []

    @property
    def manifest(self) -> dict:
        return self.bundle.manifest

    def _check_destination(self, rel: str) -> None:
        """`rel` will be renamed into place: its folder must not lead out of the bundle
        (e.g. an `openvino/` folder that is a symlink elsewhere)."""
        d = self.bundle.dir
        folder = (d / rel).parent.resolve()
        if not folder.is_relative_to(d.resolve()):
            raise UserError(f"{d / rel}: its folder resolves to {folder}, outside the bundle; refusing to write there")

    def stage(self, rel: str) -> Path:
        """Where to write the new version of bundle file `rel` (under the staging dir)."""
        self._check_destination(rel)
        p = self.staging / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if rel not in self.staged:
            self.staged.append(rel)
        return p

    def add_artifact(self, entry: dict, files: list[str]) -> dict:
        """Record an artifact (replacing one of the same backend and precision);
        `files` are its staged files, the first being its main path."""
        entry = dict(entry)
        for rel in files:
            if rel not in self.staged:
                self.staged.append(rel)
        entry["path"] = files[0]
        entry["files"] = {rel: sha256_file(self.staging / rel) for rel in files}
        entry["sha256"] = entry["files"][files[0]]
        arts = self.manifest["artifacts"]
        arts[:] = [a for a in arts if not (a["backend"] == entry["backend"] and a["precision"] == entry["precision"])]
        arts.append(entry)
        return entry

    def commit(self) -> None:
        d = self.bundle.dir
        write_json(self.staging / MANIFEST, self.manifest)
        for rel in self.staged:
            with open(self.staging / rel, "rb") as f:
                os.fsync(f.fileno())
        staging_rel = self.staging.name
        renames = [[f"{staging_rel}/{rel}", rel] for rel in self.staged] + [[f"{staging_rel}/{MANIFEST}", MANIFEST]]
        for rel in self.staged:
            self._check_destination(rel)
        _fault("before-journal")
        with _lock(d / ".commit.lock", exclusive=True):
            write_json(d / JOURNAL, {"renames": renames})  # the commit point
            _fault("after-journal")
            _recover(d, drop_leftovers=False)
        self.staged = []

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
