"""The prepared GPU check (benchmarks/gpu_check.py) at smoke size on CPU, so it cannot rot
between GPU runs: every section runs and the JSON file and table hold its figures."""

from __future__ import annotations

import json

import pytest

from benchmarks import gpu_check


def test_peak_table_matches_device_kinds():
    assert gpu_check.peak_tflops("NVIDIA H200")["bfloat16"] == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3")["tf32"] == 494.5
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe")["float32"] == 51.0
    assert gpu_check.peak_tflops("cpu") is None


@pytest.mark.slow  # ~70 s; the slow test below runs these sections too, with the rest
def test_smoke_step_sections_run_and_report(env, tmp_path, capsys):
    # The sections whose code is the check's own (timed steps, the utilisation table,
    # precisions), on their own; the protocol sections reuse code tested elsewhere.
    results = gpu_check.main(["--data", env["VCL_JAX_DATA_DIR"], "--smoke", "--only",
                              "device,steps,precision", "--out", str(tmp_path / "gpu.json")])
    sec = results["sections"]
    assert not {k: v["error"] for k, v in sec.items() if "error" in v}
    assert {"device", "steps", "precision"} <= set(sec)
    for name in gpu_check.STEP_VARIANTS:
        assert sec["steps"][name]["step_ms"] > 0
    for name in ("float32", "tf32", "bfloat16"):
        assert len(sec["precision"][name]["losses"]) == sec["precision"]["steps"]
    assert "| train step mle" in capsys.readouterr().out


@pytest.mark.slow
def test_smoke_check_runs_every_section(env, tmp_path, capsys):
    out = tmp_path / "gpu.json"
    results = gpu_check.main(["--data", env["VCL_JAX_DATA_DIR"], "--smoke", "--out", str(out)])
    with open(out) as f:
        assert json.load(f)["sections"].keys() == results["sections"].keys()
    sec = results["sections"]
    errors = {k: v["error"] for k, v in sec.items() if "error" in v}
    assert not errors, errors
    assert set(sec) == set(gpu_check.EXPECTED_S)
    for name in gpu_check.STEP_VARIANTS:
        assert sec["steps"][name]["step_ms"] > 0
    assert sec["steps"]["mle"]["mfu"] is None  # no peak known for a CPU
    assert sec["split_mnist"]["tasks"] == 2 and 0 <= sec["split_mnist"][
        "final_average_accuracy"] <= 1
    for name in ("mle_coreset0", "vcl_coreset0"):
        r = sec["paper_two_tasks"][name]
        assert len(r["task_train_s"]) == 2 and len(r["avg_uncertainty"]) == 2
        assert r["projected_10_task_train_s"] >= sum(r["task_train_s"])
    assert sec["paper_two_tasks"]["vcl_coreset0"]["pretrain_s"] > 0
    for name in ("float32", "tf32", "bfloat16"):
        assert len(sec["precision"][name]["losses"]) == sec["precision"]["steps"]
    assert sec["sampling"]["images_per_s"] > 0
    printed = capsys.readouterr().out
    assert "| train step mle" in printed and "projected 10 tasks" in printed


def test_missing_data_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no such folder"):
        gpu_check.main(["--data", str(tmp_path / "nope"), "--smoke"])
