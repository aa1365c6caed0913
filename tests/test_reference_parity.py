"""Our models give the reference implementations' logits from the same weights.

Every checkpoint here is made by the test from random weights; nothing is downloaded.
"""
import numpy as np
import pytest
import torch

from vit_deploy import build_model, save_weights

timm = pytest.importorskip("timm")
TOL = 1e-4


def _compare(ref, ours, img_size=224, batch=2):
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ref(x), ours(x)
    diff = (a - b).abs().max().item()
    print(f"{ours.spec.name}: max abs vs the reference {diff:.2e}")
    assert diff <= TOL, diff
    return diff


# vit-b16, vit-b32 and the R50 hybrid: test_export and test_engines load the same timm
# checkpoints through the whole export and compare the ONNX model with timm's.
@pytest.mark.parametrize("timm_name,name", [
    ("vit_large_patch16_224", "vit-l16"),
])
def test_timm_state_dict(tmp_path, timm_name, name):
    torch.manual_seed(0)
    ref = timm.create_model(timm_name, num_classes=1000).eval()
    path = tmp_path / "timm.pth"
    torch.save(ref.state_dict(), path)
    ours = build_model(name, weights=str(path))
    assert ours.weights_layout == "timm"
    _compare(ref, ours)


def test_timm_safetensors_with_ten_classes(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=10).eval()
    save_file(ref.state_dict(), tmp_path / "model.safetensors")
    ours = build_model("vit-ti16", weights=tmp_path / "model.safetensors")
    assert ours.num_classes == 10  # class count comes from the checkpoint
    _compare(ref, ours)


def test_transformers_checkpoint_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(num_labels=5, id2label={i: f"class{i}" for i in range(5)},
                                 label2id={f"class{i}": i for i in range(5)})
    ref = transformers.ViTForImageClassification(cfg).eval()
    ref.save_pretrained(tmp_path)
    ours = build_model("vit-b16", weights=tmp_path)
    assert ours.weights_layout == "transformers"
    assert ours.labels == [f"class{i}" for i in range(5)]
    assert ours.norm.eps == cfg.layer_norm_eps
    _compare(lambda x: ref(pixel_values=x).logits, ours)


def test_transformers_in_memory_state_dict(tmp_path):
    """transformers 5 names its modules q_proj/o_proj/mlp.fc1 in memory; torch.save keeps those."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ref = transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=3)).eval()
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    ours = build_model("vit-b16", weights=tmp_path / "pytorch_model.bin")
    # without config.json the eps is transformers' default, which this config uses too
    _compare(lambda x: ref(pixel_values=x).logits, ours)


def _to_google_npz(model, path):
    """Write a timm-named ViT in the google-research/vision_transformer .npz layout."""
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    d, h = model.spec.hidden_size, model.spec.heads
    out = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"],
    }
    for i in range(model.spec.layers):
        p, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        att = p + "MultiHeadDotProductAttention_1/"
        out[p + "LayerNorm_0/scale"], out[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        out[p + "LayerNorm_2/scale"], out[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        qw, qb = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            out[att + f"{n}/kernel"] = qw[j * d:(j + 1) * d].T.reshape(d, h, d // h)
            out[att + f"{n}/bias"] = qb[j * d:(j + 1) * d].reshape(h, d // h)
        out[att + "out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(h, d // h, d)
        out[att + "out/bias"] = sd[b + "attn.proj.bias"]
        for j, fc in ((0, "fc1"), (1, "fc2")):
            out[p + f"MlpBlock_3/Dense_{j}/kernel"] = sd[b + f"mlp.{fc}.weight"].T
            out[p + f"MlpBlock_3/Dense_{j}/bias"] = sd[b + f"mlp.{fc}.bias"]
    np.savez(path, **out)


def test_google_npz_round_trip_and_matches_timm_loader(tmp_path):
    torch.manual_seed(0)
    src = build_model("vit-ti16", num_classes=10)
    _to_google_npz(src, tmp_path / "ViT-Ti_16.npz")
    ours = build_model("vit-ti16", weights=tmp_path / "ViT-Ti_16.npz")
    assert ours.weights_layout == "google-npz"
    _compare(src, ours)
    # timm's own .npz loader reads the same file to the same logits
    from timm.models.vision_transformer import _load_weights
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=10).eval()
    _load_weights(ref, str(tmp_path / "ViT-Ti_16.npz"))
    _compare(ref, ours)


def test_own_format_round_trip_keeps_labels(tmp_path):
    src = build_model("vit-ti16", num_classes=3, img_size=64)
    save_weights(src, tmp_path / "w.safetensors", labels=["a", "b", "c"])
    ours = build_model("vit-ti16", weights=tmp_path / "w.safetensors")
    assert ours.weights_layout == "vit-deploy" and ours.labels == ["a", "b", "c"] and ours.img_size == 64
    _compare(src, ours, img_size=64)


def test_position_embedding_is_resampled_for_another_size(tmp_path):
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=10).eval()
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    ours = build_model("vit-ti16", weights=tmp_path / "w.pth", img_size=384)
    assert ours.pos_embed.shape == (1, 24 * 24 + 1, 192)
    # timm resamples the same way when asked for 384 px from 224 px weights
    ref384 = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=384).eval()
    from timm.layers import resample_abs_pos_embed
    sd = dict(ref.state_dict())
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], (24, 24), num_prefix_tokens=1)
    ref384.load_state_dict(sd)
    _compare(ref384, ours, img_size=384, batch=1)


def test_head_that_fits_neither_the_asked_classes_nor_none_names_both_shapes(tmp_path):
    """A 10-class head asked for 4 classes is the user's mismatch (issue 12): exit 2 naming both
    shapes; --num-classes 0 drops the head and gives the embedding instead."""
    from vit_deploy import UserError
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=10).eval()
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    with pytest.raises(UserError, match=r"head \[10, 192\].*4 classes need \[4, 192\]"):
        build_model("vit-ti16", weights=tmp_path / "w.pth", num_classes=4)
    ours = build_model("vit-ti16", weights=tmp_path / "w.pth", num_classes=0)
    assert ours.output == "embedding"
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref.forward_head(ref.forward_features(x), pre_logits=True),
                                   atol=TOL, rtol=0)


def test_headless_checkpoint_gives_the_embedding(tmp_path):
    """timm's headless weights (num_classes=0, as vit_huge/vit_large_patch32/the R50 hybrid are
    published) load without --num-classes and give forward_head(pre_logits=True); asking for
    classes from them names the missing head."""
    from vit_deploy import UserError
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=0).eval()
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    ours = build_model("vit-ti16", weights=tmp_path / "w.pth")
    assert ours.num_classes == 0 and ours.output == "embedding"
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref.forward_head(ref.forward_features(x), pre_logits=True)
        assert ours(x).shape == (2, 192)
        torch.testing.assert_close(ours(x), want, atol=TOL, rtol=0)
    with pytest.raises(UserError, match=r"no head .*\[10, 192\]"):
        build_model("vit-ti16", weights=tmp_path / "w.pth", num_classes=10)


def test_batch_is_never_a_python_int():
    """Tracing at batch 1 and running at batch 3 gives eager's logits: no baked batch."""
    for name, size in (("vit-ti16", 64), ("r50-vit-b16", 64)):
        m = build_model(name, num_classes=5, img_size=size)
        traced = torch.jit.trace(m, torch.randn(1, 3, size, size), check_trace=False)
        x = torch.randn(3, 3, size, size)
        torch.testing.assert_close(traced(x), m(x), atol=1e-5, rtol=1e-5)


def test_no_data_dependent_control_flow():
    """torch.export with a symbolic batch fails on Python branches over tensor values."""
    m = build_model("vit-ti16", num_classes=5, img_size=64)
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(m, (torch.randn(2, 3, 64, 64),), dynamic_shapes=({0: batch},))
    torch.testing.assert_close(ep.module()(torch.randn(5, 3, 64, 64)).shape, torch.Size([5, 5]))
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("scaled_dot_product" in o for o in ops), ops
