"""Bad weights files end with one clear line and exit 2; nothing is unpickled."""
import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, run_cli
from vit_deploy import UserError, build_model, save_weights


@pytest.fixture(scope="module")
def ti_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "ti.pth"
    torch.save(build_model("vit-ti16", num_classes=10, img_size=64).state_dict(), path)
    return path


def test_missing_file(tmp_path):
    code, _, err = run_cli("export", "--model", "vit-ti16", "--weights", tmp_path / "nope.pth", "--out", tmp_path)
    assert_one_line_error(code, err, "not found", "nope.pth")


def test_truncated_file(tmp_path, ti_weights):
    bad = tmp_path / "cut.pth"
    bad.write_bytes(ti_weights.read_bytes()[: ti_weights.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        build_model("vit-ti16", weights=bad)
    code, _, err = run_cli("export", "--model", "vit-ti16", "--weights", bad, "--out", tmp_path)
    assert_one_line_error(code, err, "cut.pth")


def test_truncated_safetensors_and_npz(tmp_path):
    m = build_model("vit-ti16", num_classes=2, img_size=32)
    save_weights(m, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match="cut.safetensors"):
        build_model("vit-ti16", weights=tmp_path / "cut.safetensors")
    np.savez(tmp_path / "w.npz", a=np.zeros(1000))
    data = (tmp_path / "w.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[:200])
    with pytest.raises(UserError, match="cut.npz"):
        build_model("vit-ti16", weights=tmp_path / "cut.npz")


def test_unknown_layout(tmp_path):
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "resnet.pth")
    with pytest.raises(UserError, match="unknown checkpoint layout"):
        build_model("vit-b16", weights=tmp_path / "resnet.pth")


def test_wrong_variant_names_tensor_and_shapes(tmp_path, ti_weights):
    code, _, err = run_cli("export", "--model", "vit-s16", "--weights", ti_weights, "--out", tmp_path)
    line = assert_one_line_error(code, err, "do not fit vit-s16")
    assert "[192]" in line and "[384]" in line or "192" in line and "384" in line, line


def test_malicious_pickle_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    torch.save({"patch_embed.proj.weight": Exploit()}, tmp_path / "evil.pth")
    code, _, err = run_cli("export", "--model", "vit-ti16", "--weights", tmp_path / "evil.pth", "--out", tmp_path)
    assert_one_line_error(code, err, "evil.pth")
    assert not marker.exists()


def test_npz_with_pickled_object_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    np.savez(tmp_path / "evil.npz", cls=np.array([Exploit()], dtype=object))
    with pytest.raises(UserError):
        build_model("vit-ti16", weights=tmp_path / "evil.npz")
    assert not marker.exists()


def test_hub_name_offline_says_pass_a_local_file(tmp_path):
    code, _, err = run_cli("export", "--model", "vit-b16", "--weights",
                           "hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", "--out", tmp_path,
                           env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert_one_line_error(code, err, "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", "--weights PATH")


def test_hub_name_goes_through_the_hub_cache(tmp_path, monkeypatch):
    """The hub path, with the download replaced by a local cache directory."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.ViTForImageClassification(
        transformers.ViTConfig(num_labels=2, image_size=32, patch_size=16, hidden_size=192,
                               num_hidden_layers=12, num_attention_heads=3, intermediate_size=768)).eval()
    ref.save_pretrained(tmp_path / "cache" / "google--vit-tiny")
    asked = []
    import vit_deploy.weights as w
    monkeypatch.setattr(w, "_hub_download", lambda repo: asked.append(repo) or str(tmp_path / "cache" / "google--vit-tiny"))
    m = build_model("vit-ti16", weights="google/vit-tiny")
    assert asked == ["google/vit-tiny"] and m.img_size == 32 and m.num_classes == 2
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(m(x), ref(pixel_values=x).logits, atol=1e-4, rtol=0)
