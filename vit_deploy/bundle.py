"""The bundle: a directory of artifacts and the manifest.json that every stage
reads and extends.

Writes go through a Transaction: new files are staged in a hidden directory,
then a journal naming every rename is written (the commit point), then the
renames happen and the journal is removed. Whoever opens the bundle next
finishes a journalled commit or discards an unjournalled one, so a process
killed at any moment leaves the bundle as it was or complete. One writer at a
time holds `.write.lock`; a second one is refused with a clear message.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import uuid
from pathlib import Path

from .atomic import _fsync_dir, write_json
from .errors import UserError
from .weights import sha256_file

log = logging.getLogger("vit_deploy")
MANIFEST = "manifest.json"
JOURNAL = ".journal.json"
FORMAT_VERSION = 1


def _fault(point: str) -> None:
    """Test hook: VIT_DEPLOY_FAULT=<point> kills this process there, as a power cut would."""
    if os.environ.get("VIT_DEPLOY_FAULT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _recover(directory: Path, drop_leftovers: bool) -> None:
    """Finish a journalled commit; with `drop_leftovers` (only when no writer can be
    running) also remove what an unfinished, unjournalled one staged."""
    journal = directory / JOURNAL
    if journal.exists():
        try:
            plan = json.loads(journal.read_text())
        except ValueError:  # a torn journal cannot exist (atomic write); be safe anyway
            plan = {"renames": []}
        for src, dst in plan["renames"]:
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


@contextlib.contextmanager
def _lock(path: Path, exclusive: bool, blocking: bool = True):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
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
        with _lock(directory / ".commit.lock", exclusive=True):
            _recover(directory, drop_leftovers=False)
            try:
                manifest = json.loads((directory / MANIFEST).read_text())
            except ValueError as e:
                raise UserError(f"{directory / MANIFEST}: not valid JSON ({e})") from None
        if manifest.get("format_version") != FORMAT_VERSION or "artifacts" not in manifest:
            raise UserError(f"{directory / MANIFEST}: not a vit-deploy manifest of format {FORMAT_VERSION}")
        return cls(directory, manifest)

    @property
    def artifacts(self) -> list[dict]:
        return self.manifest["artifacts"]

    def find(self, backend: str, precision: str) -> dict | None:
        return next((a for a in self.artifacts if a["backend"] == backend and a["precision"] == precision), None)

    def path(self, artifact: dict) -> Path:
        return self.dir / artifact["path"]

    def verify(self, artifact: dict) -> Path:
        """Check every file of an artifact against its recorded sha256 before it is used."""
        for rel, digest in artifact.get("files", {artifact["path"]: artifact["sha256"]}).items():
            p = self.dir / rel
            if not p.is_file():
                raise UserError(f"{p}: artifact file is missing; rebuild the bundle with `vit-deploy export --force`")
            if sha256_file(p) != digest:
                raise UserError(f"{p}: sha256 does not match the manifest (changed after it was built); "
                                f"refusing to run it; rebuild with `vit-deploy export --force`")
        return self.dir / artifact["path"]

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


class Transaction:
    """Files staged for a bundle and committed together with its manifest."""

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.staging = bundle.dir / f".staging-{uuid.uuid4().hex[:12]}"
        self.staged: list[str] = []

    @property
    def manifest(self) -> dict:
        return self.bundle.manifest

    def stage(self, rel: str) -> Path:
        """Where to write the new version of bundle file `rel` (under the staging dir)."""
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
        _fault("before-journal")
        with _lock(d / ".commit.lock", exclusive=True):
            write_json(d / JOURNAL, {"renames": renames})  # the commit point
            _fault("after-journal")
            _recover(d, drop_leftovers=False)
        self.staged = []

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
