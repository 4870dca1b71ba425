"""`cyborg bench serve` end to end on a tiny model: a real server subprocess, short windows."""

from __future__ import annotations

import json

import pytest

from cyborg.cli import main
from benchmarks.serve import format_report
from tests.serving_fixtures import build_model_repository

LATENCY_KEYS = {"requests", "errors", "seconds", "throughput", "p50_ms", "p90_ms", "p99_ms", "mean_ms"}


def test_bench_serve_json_report(tmp_path, capsys):
    repository = build_model_repository(tmp_path / "repo", name="tiny", versions=(1, 3), size=32)
    code = main(["bench", "serve", "--model-repository", str(repository), "--concurrency", "1,2",
                 "--duration", "0.4", "--rounds", "2", "--warmup", "0.1", "--json"])  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert {"model", "server", "baseline", "sweep", "poisson", "peak_tensor_throughput", "targets"} <= set(report)
    assert (report["model"]["name"], report["model"]["version"]) == ("tiny", 3)
    assert report["server"]["mode"] == "subprocess"

    base = report["baseline"]
    assert str(base["best_batch"]) in base["search"] and base["tensor"] > 0 and base["image"] > 0
    assert base["tensor_per_cpu_second"] > 0 and base["image_per_cpu_second"] > 0

    assert [(row["kind"], row["concurrency"]) for row in report["sweep"]] == [("tensor", 1), ("image", 1), ("tensor", 2), ("image", 2)]
    for row in report["sweep"] + [report["poisson"]]:
        assert LATENCY_KEYS <= set(row)
        assert row["errors"] == 0 and row["requests"] > 0 and row["throughput"] > 0
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
    for row in report["sweep"]:
        assert row["ratio"] == pytest.approx(row["throughput"] / row["baseline"], abs=1e-3)
        assert 0 < row["batch_ceiling"] <= 1.0
        assert row["per_cpu_second"] > 0 and row["cpu_ratio"] == pytest.approx(row["per_cpu_second"] / row["baseline_per_cpu_second"], abs=1e-3)

    peak = max(row["throughput"] for row in report["sweep"] if row["kind"] == "tensor")
    assert report["peak_tensor_throughput"] == peak
    assert report["poisson"]["rate"] == pytest.approx(peak / 2, rel=0.01)
    assert report["poisson"]["ideal_batcher"]["p99_over_p50"] >= 1.0
    assert report["poisson"]["p99_over_p50"] == pytest.approx(report["poisson"]["p99_ms"] / report["poisson"]["p50_ms"], rel=0.01)
    assert report["targets"]["tensor_ratio"] is None  # no concurrency >= 16 in this run
    assert report["targets"]["tail_met"] == (report["poisson"]["p99_over_p50"] <= 2.0)

    table = format_report(report)
    assert "poisson" in table and "targets at concurrency" in table


def test_bench_serve_rejects_bad_options(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "serve", "--concurrency", "1,x"])
    assert main(["bench", "serve", "--model-repository", str(tmp_path / "none")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_ideal_batcher_tail_depends_on_what_batching_saves():
    from benchmarks.serve import ideal_batcher

    cpu_like = ideal_batcher(25.0, {1: 45.0, 8: 46.0, 32: 48.0}, max_batch=32)  # linear cost: no saving
    gpu_like = ideal_batcher(1000.0, {1: 200.0, 8: 1500.0, 32: 2000.0}, max_batch=32)  # batch 8 costs 2.7x batch 1
    assert cpu_like["p50_ms"] > 1000 / 45.0 * 0.99  # never faster than one image alone
    assert cpu_like["p99_over_p50"] > 3.0
    assert gpu_like["p99_over_p50"] < 2.0


def test_folder_images_reads_the_readable_images_of_a_folder(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from benchmarks.serve import folder_images

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buffer, format="PNG")
    (tmp_path / "a.png").write_bytes(buffer.getvalue())
    (tmp_path / "b.jpg").write_bytes(b"not an image")
    assert folder_images(tmp_path) == [buffer.getvalue()]
