"""The zoo table: structure as data, parameter counts, the `models` command."""
import json

import pytest

from conftest import assert_one_line_error, run_cli
from vit_deploy.models import count_model
from vit_deploy.zoo import ZOO, get_spec

# The reference figures (issue #2). timm's own counts: vit-l32, vit-h14 and the
# hybrid default to num_classes=0 in timm, so their reference figures are the
# headless counts; the rest are with the 1000-class head.
REFERENCE_M = {
    "vit-b16": (86.57, 1000), "vit-b32": (88.22, 1000), "vit-l16": (304.33, 1000),
    "vit-l32": (305.51, 0), "vit-h14": (630.76, 0), "r50-vit-b16": (97.89, 0),
    "vit-ti16": (5.72, 1000), "vit-s16": (22.05, 1000),
}


@pytest.mark.parametrize("name", list(REFERENCE_M))
def test_param_counts_match_reference(name):
    ref, classes = REFERENCE_M[name]
    params, _ = count_model(get_spec(name), num_classes=classes)
    assert abs(params / 1e6 - ref) / ref < 0.005, (name, params)
    if classes == 0:  # with the 1000-class head: exactly D*1000 + 1000 more
        with_head, _ = count_model(get_spec(name), num_classes=1000)
        assert with_head - params == get_spec(name).hidden_size * 1000 + 1000


def test_any_img_size_and_class_count():
    from vit_deploy import build_model
    import torch
    m = build_model("vit-ti16", num_classes=7, img_size=96)
    assert m(torch.randn(2, 3, 96, 96)).shape == (2, 7)
    m = build_model("r50-vit-b16", num_classes=3, img_size=64)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_models_json_lists_every_variant():
    code, out, err = run_cli("models", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["name"] for r in rows] == list(ZOO)
    b16 = next(r for r in rows if r["name"] == "vit-b16")
    assert (b16["patch_size"], b16["layers"], b16["hidden_size"], b16["mlp_size"], b16["heads"]) == (16, 12, 768, 3072, 12)
    assert abs(b16["params"] - 86_567_656) < 10 and 34 < b16["gflops"] < 36


def test_models_table_prints():
    code, out, _ = run_cli("models")
    assert code == 0 and "vit-h14" in out and "GFLOPs" in out
    assert "timm:NAME" in out and "hf:DIR" in out and "--num-classes 0" in out  # the other sources (issue 12)


def test_unknown_model_suggests_close_names():
    code, _, err = run_cli("export", "--model", "vit-b61", "--out", "/tmp/never")
    assert_one_line_error(code, err, "unknown model", "vit-b16")


def test_image_size_not_divisible_by_patch():
    from vit_deploy import UserError, build_model
    with pytest.raises(UserError, match="multiple of .* 16"):
        build_model("vit-b16", img_size=200)
