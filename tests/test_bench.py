"""`vit-deploy bench`: interleaved timing, reports, plot, bad input."""
import csv
import json


from conftest import assert_one_line_error, run_cli
from vit_deploy.bench import bench


def test_bench_reports_every_artifact_and_batch(ti_bundle, tmp_path):
    code, out, err = run_cli("bench", ti_bundle, "--batch", "1,4", "--iters", "3", "--warmup", "1", "--threads", "2",
                             "--json", tmp_path / "b.json", "--csv", tmp_path / "b.csv",
                             "--markdown", tmp_path / "b.md", "--plot", tmp_path / "b.png", "--device-info")
    assert code == 0, err
    report = json.loads((tmp_path / "b.json").read_text())
    names = {r["artifact"] for r in report["results"]}
    assert {"torch-fp32", "onnxruntime-fp32", "onnxruntime-int8", "openvino-fp16"} <= names
    assert {r["batch"] for r in report["results"]} == {1, 4}
    for r in report["results"]:
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["iterations"] == 3 and r["throughput"] > 0
    assert sum(r["fastest"] for r in report["results"]) == 2  # one per batch size
    assert report["reference"] == "onnxruntime-fp32"
    assert "isa" in report["device"] and "avx512_vnni" in report["device"]["isa"]
    rows = list(csv.DictReader((tmp_path / "b.csv").read_text().splitlines()))
    assert len(rows) == len(report["results"])
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "x vs onnxruntime-fp32" in out and " *" in out
    assert json.loads((ti_bundle / "manifest.json").read_text())["latency"]["results"]


def test_filters_and_duration(ti_bundle):
    r = bench(ti_bundle, backends=["openvino"], precisions=["int8"], duration=0.2, warmup=1, record=False)
    assert {x["artifact"] for x in r["results"]} == {"openvino-int8"}


def test_bad_input(ti_bundle):
    code, _, err = run_cli("bench", ti_bundle, "--iters", "2", "--duration", "1")
    assert_one_line_error(code, err, "--iters and --duration")
    code, _, err = run_cli("bench", ti_bundle, "--backends", "tensorrt", "--no-torch")
    assert_one_line_error(code, err, "no artifact for tensorrt", "onnxruntime-int8")
    code, out, err = run_cli("bench", ti_bundle, "--batch", "1,64", "--iters", "1", "--warmup", "0",
                             "--backends", "onnx")
    assert code == 0 and "batch 64 skipped" in err, err
