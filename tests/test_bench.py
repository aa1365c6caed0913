"""`vit-deploy bench`: interleaved timing, reports, plot, bad input."""
import csv
import json


from conftest import assert_one_line_error, run_cli
from vit_deploy.bench import _int8_notes, bench, int8_not_faster


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
    for f in report["int8_not_faster"]:  # each runtime whose INT8 lost to its own FP32 is named under the table
        assert f"note: {f['runtime']}-int8 runs at" in out


def test_an_int8_artifact_no_faster_than_its_fp32_is_named():
    rows = [{"artifact": "openvino-fp32", "batch": 1, "p50_ms": 100.0, "p90_ms": 101.0, "p99_ms": 102.0},
            {"artifact": "openvino-int8", "batch": 1, "p50_ms": 125.0},
            {"artifact": "onnxruntime-fp32", "batch": 1, "p50_ms": 120.0},
            {"artifact": "onnxruntime-int8", "batch": 1, "p50_ms": 80.0},
            {"artifact": "openvino-int8", "batch": 8, "p50_ms": 500.0}]  # no FP32 at batch 8: no verdict
    found = int8_not_faster(rows)
    assert found == [{"runtime": "openvino", "batch": 1, "speedup": 0.8}]
    avx2 = {"avx2": True, "avx512f": False, "avx512_vnni": False, "avx_vnni": False, "amx_tile": False}
    notes = _int8_notes({"int8_not_faster": found, "device": {"isa": avx2}})
    assert notes == ["note: openvino-int8 runs at 0.80x openvino-fp32 at batch 1: on this machine the FP32 artifact "
                     "is the faster one (this CPU has no VNNI: x86 INT8 matrix kernels gain little or nothing "
                     "without it)"]
    vnni = dict(avx2, avx512f=True, avx512_vnni=True)
    assert "VNNI" not in _int8_notes({"int8_not_faster": found, "device": {"isa": vnni}})[0]


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
