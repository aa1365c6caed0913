"""Signed bundles (issue 14): `vit-deploy sign` / `verify` over every file, and
--require-signature (or VIT_DEPLOY_REQUIRE_SIGNATURE) on predict, check and bench,
naming what changed or was added; the core install does not need model-signing."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, assert_one_line_error
from test_bundle_safety import IMAGE, copy_tiny, invoke, replace_bytes, tiny_bundle_source

pytest.importorskip("model_signing", reason="the `sign` extra (model-signing, pyopenssl) is not installed")


@pytest.fixture(autouse=True)
def _quiet_log(monkeypatch):
    import logging
    monkeypatch.setattr(logging.getLogger("vit_deploy"), "handlers", [logging.NullHandler()])


def _key_pair(directory: Path, name: str) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = directory / f"{name}.pem", directory / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return {"ci": _key_pair(d, "ci"), "other": _key_pair(d, "other")}


@pytest.fixture(scope="module")
def signed(tmp_path_factory, keys):
    """A signed copy of the tiny bundle; tests copy it again before changing anything."""
    d = copy_tiny(tiny_bundle_source(tmp_path_factory), tmp_path_factory.mktemp("signed") / "vit-ti16")
    code, out, err, exc = invoke("sign", d, "--key", keys["ci"][0])
    assert (code, exc) == (0, None), err
    assert (d / "bundle.sig").is_file()
    return d


def _copy(signed: Path, tmp_path: Path) -> Path:
    d = copy_tiny(signed, tmp_path / "vit-ti16")
    return d


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    replace_bytes(path, bytes(data))


def test_round_trip_and_the_untouched_bundle_runs(signed, keys, tmp_path):
    d = _copy(signed, tmp_path)
    code, out, err, exc = invoke("verify", d, "--key", keys["ci"][1])
    assert code == 0 and "signature ok" in out, err
    code, out, err, exc = invoke("predict", d, IMAGE, "--require-signature", keys["ci"][1])
    assert code == 0 and "onnxruntime-int8" in out, err
    # bench with a required signature leaves the bundle as signed (no latency recorded)
    code, out, err, exc = invoke("bench", d, "--no-torch", "--iters", "1", "--warmup", "0", "--backends", "onnx",
                                 "--precisions", "int8", "--require-signature", keys["ci"][1])
    assert code == 0, err
    assert "latency" not in json.loads((d / "manifest.json").read_text())
    assert invoke("verify", d, "--key", keys["ci"][1])[0] == 0


@pytest.mark.parametrize("change", ["int8 byte", "added file", "manifest edit"])
def test_changes_after_signing_are_named(signed, keys, tmp_path, change):
    d = _copy(signed, tmp_path)
    if change == "int8 byte":
        _flip_one_byte(d / "model.int8.onnx")
        named = "changed: model.int8.onnx"
    elif change == "added file":
        (d / "notes.txt").write_text("added after signing")
        named = "added: notes.txt"
    else:
        m = json.loads((d / "manifest.json").read_text())
        m["max_batch"] = 2
        replace_bytes(d / "manifest.json", json.dumps(m).encode())
        named = "changed: manifest.json"
    code, out, err, exc = invoke("verify", d, "--key", keys["ci"][1])
    assert_one_line_error(code, err, named)
    code, out, err, exc = invoke("predict", d, IMAGE, "--require-signature", keys["ci"][1])
    assert exc is None
    assert_one_line_error(code, err, named)


def test_fleet_variable_and_check_and_bench_require_it(signed, keys, tmp_path):
    """VIT_DEPLOY_REQUIRE_SIGNATURE applies to predict, check and bench without the option."""
    d = _copy(signed, tmp_path)
    _flip_one_byte(d / "model.int8.onnx")
    env = {"VIT_DEPLOY_REQUIRE_SIGNATURE": str(keys["ci"][1])}
    for args in (["predict", d, IMAGE], ["check", d, "--golden", tmp_path / "none.npz"],
                 ["bench", d, "--no-torch", "--iters", "1"]):
        code, out, err, exc = invoke(*args, env=env)
        assert exc is None
        assert_one_line_error(code, err, "model.int8.onnx")
    code, out, err, exc = invoke("check", d, "--store", "--set", "int8.min_cosine=0.9",
                                 "--require-signature", keys["ci"][1])
    assert_one_line_error(code, err)  # refused before anything is written: the bundle is signed


def test_unsigned_bundle_is_refused(tiny_unsigned, keys):
    code, out, err, exc = invoke("predict", tiny_unsigned, IMAGE, "--require-signature", keys["ci"][1])
    assert_one_line_error(code, err, "not signed")
    code, out, err, exc = invoke("verify", tiny_unsigned, "--key", keys["ci"][1])
    assert_one_line_error(code, err, "not signed")


@pytest.fixture
def tiny_unsigned(tmp_path_factory, tmp_path):
    return copy_tiny(tiny_bundle_source(tmp_path_factory), tmp_path / "vit-ti16")


def test_bad_keys_and_signatures(signed, keys, tmp_path):
    d = _copy(signed, tmp_path)
    code, out, err, exc = invoke("verify", d, "--key", keys["other"][1])
    assert_one_line_error(code, err, "key does not match")
    code, out, err, exc = invoke("predict", d, IMAGE, "--require-signature", keys["other"][1])
    assert_one_line_error(code, err, "key does not match")
    code, out, err, exc = invoke("verify", d, "--key", tmp_path / "missing.pub.pem")
    assert_one_line_error(code, err, "missing.pub.pem", "cannot read")
    code, out, err, exc = invoke("verify", d, "--key", tmp_path)  # a directory: unreadable as a key
    assert_one_line_error(code, err, "cannot read")
    code, out, err, exc = invoke("sign", d, "--key", tmp_path / "missing.pem")
    assert_one_line_error(code, err, "missing.pem")
    code, out, err, exc = invoke("sign", d, "--key", keys["ci"][1])  # a public key where the private one belongs
    assert_one_line_error(code, err, "private key")
    replace_bytes(d / "bundle.sig", b'{"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json", "dsse')
    code, out, err, exc = invoke("verify", d, "--key", keys["ci"][1])
    assert_one_line_error(code, err, "does not parse")
    replace_bytes(d / "bundle.sig", json.dumps({"dsseEnvelope": {"payload": "%%%"}}).encode())
    code, out, err, exc = invoke("predict", d, IMAGE, "--require-signature", keys["ci"][1])
    assert_one_line_error(code, err, "does not parse")


def test_signature_kept_elsewhere(signed, keys, tmp_path):
    """--signature outside the bundle: sign and verify with it; the bundle's own file is unaffected."""
    d = _copy(signed, tmp_path)
    (d / "bundle.sig").unlink()
    sig = tmp_path / "release.sig"
    assert invoke("sign", d, "--key", keys["other"][0], "--signature", sig)[0] == 0
    assert invoke("verify", d, "--key", keys["other"][1], "--signature", sig)[0] == 0
    code, out, err, exc = invoke("verify", d, "--key", keys["other"][1])
    assert_one_line_error(code, err, "not signed")


def test_without_model_signing_the_commands_name_the_extra(signed, keys, tmp_path, monkeypatch):
    d = _copy(signed, tmp_path)
    for name in [m for m in sys.modules if m == "model_signing" or m.startswith("model_signing.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "model_signing", None)  # import fails as when not installed
    code, out, err, exc = invoke("verify", d, "--key", keys["ci"][1])
    assert_one_line_error(code, err, "vit-deploy[sign]")
    code, out, err, exc = invoke("info", d)  # reading a bundle never needs it
    assert code == 0, err


def test_core_install_does_not_need_model_signing():
    """model-signing is only in the `sign` (and `test`) extras, and opening or running
    a bundle does not import it."""
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml with the standard library")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not any("model-signing" in dep for dep in project["dependencies"])
    assert any(dep.startswith("model-signing") for dep in project["optional-dependencies"]["sign"])
    assert "pyopenssl" in [dep.lower() for dep in project["optional-dependencies"]["sign"]]
    code = ("import sys, vit_deploy.cli, vit_deploy.bundle, vit_deploy.predict, vit_deploy.info;"
            "print(any(m.startswith('model_signing') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_encrypted_key_with_its_password_from_the_environment(tiny_unsigned, keys, tmp_path):
    from cryptography.hazmat.primitives import serialization
    key = serialization.load_pem_private_key(keys["ci"][0].read_bytes(), password=None)
    encrypted = tmp_path / "enc.pem"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"s3cret")))
    code, out, err, exc = invoke("sign", tiny_unsigned, "--key", encrypted)
    assert_one_line_error(code, err, "enc.pem", "password")
    code, out, err, exc = invoke("sign", tiny_unsigned, "--key", encrypted, "--password-env", "KEY_PASS",
                                 env={"KEY_PASS": "wrong"})
    assert_one_line_error(code, err, "password")
    code, out, err, exc = invoke("sign", tiny_unsigned, "--key", encrypted, "--password-env", "KEY_PASS",
                                 env={"KEY_PASS": "s3cret"})
    assert code == 0, err
    assert invoke("verify", tiny_unsigned, "--key", keys["ci"][1])[0] == 0
