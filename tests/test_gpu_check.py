"""`cyborg bench gpu --dry-run`: the GPU proof's whole script on the CPU with tiny models, and its JSON."""

import json

import pytest

from benchmarks.gpu_check import STEPS, Settings, targets
from cyborg.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_dry_run_writes_every_step_with_figures_or_reasons(tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["bench", "gpu", "--dry-run", "--out", str(out), "--work", str(work), "--serve-concurrency", "1", "--serve-duration", "0.3"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "gpu check (dry run, CPU)" in printed and "gpu_check.json" in printed
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True and report["finished"] and report["wall_s"] > 0
    assert list(report["steps"]) == list(STEPS)
    assert report["summary"]["failed"] == {}
    for name, step in report["steps"].items():
        assert step["status"] in ("ok", "skipped"), (name, step)
        assert step["seconds"] >= 0
        if step["status"] == "skipped":
            assert step["reason"], name

    env = report["environment"]
    assert env["cpus"] >= 1 and env["torch"] and "onnxruntime_providers" in env and "tensorrt" in env

    (row,) = report["steps"]["bench_train"]["results"]
    assert row["arch"] == "cyborg_local_tiny" and row["cyborg_vs_ce"] > 0
    assert all(value > 0 for value in row["images_per_s"].values())

    train = report["steps"]["train"]
    assert train["data"] == "synthetic (dry run)" and train["command"].startswith("cyborg train")
    assert train["epochs"][0]["train_images_per_s"] > 0 and train["images_per_s_last_epoch"] > 0

    export = report["steps"]["export"]
    assert export["source"].endswith("best.pt") and "model.onnx" in export["files"]
    parity = export["export"]["parity_max_abs_diff"]
    assert max(parity[name] for name in ("score", "logits", "cam")) < 1e-3 and parity["class_agreement"] == 1.0

    cuda = report["steps"]["onnxruntime_cuda"]  # no GPU here: skipped with the reason, the code exercised on the CPU provider
    assert cuda["status"] == "skipped" and "CUDA" in cuda["reason"]
    assert cuda["dry_run_exercise"]["providers"] == ["CPUExecutionProvider"]
    assert cuda["dry_run_exercise"]["parity_vs_cpu"]["score"] == 0.0
    assert report["steps"]["tensorrt"]["status"] == "skipped" and "GPU" in report["steps"]["tensorrt"]["reason"]

    serve = report["steps"]["serve"]
    assert serve["status"] == "ok" and serve["engine_on_gpu"] is False
    assert serve["report"]["server"]["engine"] == "onnxruntime" and serve["report"]["sweep"][0]["errors"] == 0
    assert serve["server_vs_raw_engine"] > 0 and serve["p99_over_p50_half_peak"] >= 1

    t = report["targets"]
    assert t["cyborg_step_vs_ce:cyborg_local_tiny"]["target"] == "<= 1.02" and t["cyborg_step_vs_ce:cyborg_local_tiny"]["on_gpu"] is False
    assert t["tensorrt_vs_onnxruntime_cuda_batch32"]["met"] is None
    assert t["server_vs_raw_engine"]["value"] == serve["server_vs_raw_engine"]


def test_gpu_mode_without_cuda_records_skips_not_failures(tmp_path, monkeypatch):
    """Without a CUDA device the GPU run skips the torch and engine steps, saying why, and still writes its JSON."""
    import torch

    from benchmarks.gpu_check import GpuCheck

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    settings = Settings(out=tmp_path / "out", work=tmp_path / "work", skip=("export", "serve"), data=tmp_path / "missing")
    report = GpuCheck(settings).run()
    steps = report["steps"]
    assert steps["bench_train"]["status"] == "skipped" and "torch.cuda.is_available() is False" in steps["bench_train"]["reason"]
    assert steps["train"]["status"] == "skipped" and "--data" in steps["train"]["reason"]
    assert steps["serve"] == {"status": "skipped", "reason": "--skip"}
    assert report["summary"]["failed"] == {}
    assert "no model" in steps["onnxruntime_cuda"]["reason"] and steps["tensorrt"]["status"] == "skipped"
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text())["dry_run"] is False


def test_targets_judge_the_issues_thresholds():
    report = {"dry_run": False, "steps": {
        "bench_train": {"results": [{"arch": "resnet50", "cyborg_vs_ce": 1.01}, {"arch": "densenet121", "cyborg_vs_ce": 1.05}]},
        "serve": {"engine_on_gpu": True, "server_vs_raw_engine": 0.93, "p99_over_p50_half_peak": 2.4},
        "tensorrt": {"speedup_vs_onnxruntime_cuda_batch32": 3.2, "parity_ok": True, "parity": {"score": 1e-3}},
    }}  # fmt: skip
    found = targets(report)
    assert found["cyborg_step_vs_ce:resnet50"]["met"] is True and found["cyborg_step_vs_ce:densenet121"]["met"] is False
    assert found["server_vs_raw_engine"]["met"] is True and found["p99_over_p50_half_peak"]["met"] is False
    assert found["tensorrt_vs_onnxruntime_cuda_batch32"]["met"] is True and found["parity:tensorrt"]["met"] is True
    assert found["parity:onnxruntime_cuda"]["met"] is None
