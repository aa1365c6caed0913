"""Signing a bundle, and verifying it before use: a thin layer over OpenSSF model
signing (PyPI `model-signing`, the `sign` extra), imported only here and only
when asked for, so the core install does not need it.

The signature covers every file of the bundle directory (manifest.json, every
artifact, anything else put there), each by sha256, in a Sigstore bundle signed
with an elliptic-curve key. Left out: the signature file itself and the empty
lock files that opening a bundle creates. Symlinks are refused. A signature
made with Sigstore's keyless flow (model_signing's own CLI) is a documented
option (README); vit-deploy verifies key signatures.

Why not the manifest's own sha256 values: anyone who edits a file can edit its
hash; only a signature proves who made the bundle.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path

from .bundle import LOCKS, MANIFEST, sha256_file
from .errors import UserError

SIGNATURE = "bundle.sig"  # default place: inside the bundle, so it travels with it
SIGN_EXTRA = "pip install 'vit-deploy[sign]' (model-signing and pyopenssl)"


def _model_signing():
    try:
        import model_signing.hashing
        import model_signing.signing
        import model_signing.verifying
    except ImportError as e:  # 1.1.1 imports OpenSSL (pyopenssl) without declaring it
        raise UserError(f"signing bundles needs model-signing ({e.name or e} is missing): {SIGN_EXTRA}") from None
    return model_signing


def _ignored(signature: Path, directory: Path) -> list[str]:
    """What the signature leaves out: itself (when inside the bundle) and the lock files."""
    names = [SIGNATURE, *LOCKS]
    try:
        rel = signature.resolve().relative_to(directory.resolve()).as_posix()
        if rel not in names:
            names.append(rel)
    except ValueError:
        pass
    return names


def _hashing_config(ms, ignored: list[str]):
    # every file counts, git files too; symlinks are refused (model-signing's default)
    return ms.hashing.Config().set_ignored_paths(paths=ignored, ignore_git_paths=False)


def _bundle_dir(bundle) -> Path:
    d = Path(bundle)
    if d.is_file() and d.name == MANIFEST:
        d = d.parent
    if not (d / MANIFEST).is_file():
        raise UserError(f"{d}: not a vit-deploy bundle (no {MANIFEST})")
    return d


def _read_key(path, what: str) -> Path:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UserError(f"{p}: cannot read the {what} ({e.strerror or e})") from None
    if b"-----BEGIN" not in data:
        raise UserError(f"{p}: not a PEM {what}")
    return p


def sign_bundle(bundle, private_key, signature=None, password: str | None = None) -> Path:
    """Sign every file of `bundle` with an EC private key (PEM); returns the signature path."""
    from .bundle import Bundle
    d = _bundle_dir(bundle)
    Bundle.open(d)  # never sign a bundle that fails its own checks
    key = _read_key(private_key, "private key")
    sig = Path(signature) if signature else d / SIGNATURE
    ms = _model_signing()
    try:
        # cryptography wants the password as bytes (model-signing passes it through)
        config = ms.signing.Config().use_elliptic_key_signer(private_key=key,
                                                             password=password.encode() if password else None)
    except (ValueError, TypeError) as e:  # not an EC key, encrypted without password, wrong password
        # a wrong password usually reads "Bad decrypt", but about 1 in 256 wrong keys decrypt to valid
        # padding and fail later as "could not deserialize": name the password whenever one was given
        hint = ", or the password is wrong" if password else ""
        raise UserError(f"{key}: not a usable EC private key{hint} ({str(e).splitlines()[0][:120]})") from None
    tmp = sig.with_name(f".{sig.name}.tmp")
    try:
        ignored = sorted(set(_ignored(sig, d) + _ignored(tmp, d)))
        config.set_hashing_config(_hashing_config(ms, ignored)).sign(d, tmp)
        os.replace(tmp, sig)
    except ValueError as e:  # a symlink in the bundle, for one
        raise UserError(f"{d}: cannot sign: {e}") from None
    except OSError as e:
        raise UserError(f"cannot write the signature {sig}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return sig


def _parse(sig: Path) -> dict:
    """The signed statement of a signature file ({name: sha256}, ignore paths), or one
    line saying it does not parse. Trusted only after the signature verified."""
    try:
        raw = json.loads(sig.read_text())
        envelope = raw["dsseEnvelope"]
        if not envelope["signatures"][0]["sig"] or not isinstance(raw["verificationMaterial"], dict):
            raise ValueError("no signature")
        statement = json.loads(base64.b64decode(envelope["payload"], validate=True))
        predicate = statement["predicate"]
        files = {r["name"]: r["digest"] for r in predicate["resources"]}
        ignored = list(predicate["serialization"].get("ignore_paths", []))
    except OSError as e:
        raise UserError(f"{sig}: cannot read the signature ({e.strerror or e})") from None
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, binascii.Error) as e:
        raise UserError(f"{sig}: not a model-signing signature (does not parse: {type(e).__name__})") from None
    return {"files": files, "ignored": ignored}


def _differences(d: Path, signed: dict, ignored: list[str]) -> str:
    """Which files changed, were added or are missing since signing."""
    skip = set(ignored) | set(signed["ignored"])
    now = {}
    for root, dirs, names in os.walk(d):
        for name in names:
            p = Path(root, name)
            rel = p.relative_to(d).as_posix()
            if rel in skip or p.is_symlink():
                continue
            now[rel] = sha256_file(p)
    changed = sorted(n for n in now if n in signed["files"] and now[n] != signed["files"][n])
    added = sorted(set(now) - set(signed["files"]))
    missing = sorted(set(signed["files"]) - set(now))
    parts = [f"{label}: {', '.join(names)}" for label, names in
             (("changed", changed), ("added", added), ("missing", missing)) if names]
    return "; ".join(parts)


def verify_bundle(bundle, public_key, signature=None) -> int:
    """Verify that every file of `bundle` is as signed with the key pair of `public_key`;
    returns the number of files checked, or raises UserError naming what differs."""
    d = _bundle_dir(bundle)
    key = _read_key(public_key, "public key")
    sig = Path(signature) if signature else d / SIGNATURE
    if not os.path.lexists(sig):
        raise UserError(f"{d}: not signed (no {sig}); sign it with `vit-deploy sign {d} --key KEY.pem`")
    if sig.is_symlink():
        raise UserError(f"{sig}: a symlink; refusing to read it")
    signed = _parse(sig)
    ms = _model_signing()
    ignored = _ignored(sig, d)
    try:
        config = ms.verifying.Config().use_elliptic_key_verifier(public_key=key)
    except (ValueError, TypeError) as e:
        raise UserError(f"{key}: not a usable EC public key ({str(e).splitlines()[0][:120]})") from None
    try:
        config.set_hashing_config(_hashing_config(ms, ignored)).verify(d, sig)
    except ValueError as e:
        text = str(e)
        if text.startswith("Key mismatch"):
            raise UserError(f"{sig}: the key does not match: {key} is not the key this bundle was signed with") from None
        if text.startswith("Signature mismatch"):
            diff = _differences(d, signed, ignored) or text[:300]
            raise UserError(f"{d}: files differ from the signature ({diff}); refusing to use it") from None
        raise UserError(f"{d}: signature check failed: {text.splitlines()[0][:200]}") from None
    except Exception as e:  # noqa: BLE001 - the signature is untrusted input; its failures are the user's
        from cryptography.exceptions import InvalidSignature
        if isinstance(e, InvalidSignature):
            raise UserError(f"{sig}: the signature does not verify with {key}: the key does not match "
                            f"(or the signature was altered)") from None
        raise UserError(f"{sig}: not a valid signature ({type(e).__name__}: {str(e)[:120]})") from None
    return len(signed["files"])
