"""benchmarks.feature_probe: linear probes on frozen features, fitted without one source."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from benchmarks import feature_probe
from tests.datasets import make_plain_dataset


@pytest.fixture(scope="module")
def two_generators(tmp_path_factory):
    """12 reals, 12 fakes from "gan" and 12 from "diffusion" (both with the bright-region cue), 32 px."""
    return make_plain_dataset(tmp_path_factory.mktemp("probe"), n_real=24, n_fake=24, size=32, sources=["gan", "diffusion"])


def test_probes_leave_the_held_out_source_out_of_training_and_score_it(two_generators, tmp_path, capsys, one_torch_thread):
    out = tmp_path / "probe.json"
    code = feature_probe.main([str(two_generators), "--holdout", "diffusion", "--arch", "efficientnet_lite0", "--weights", "none",
                               "--image-size", "32", "--val-fraction", "0.25", "--out", str(out)])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    # 24 reals and 12 + 12 fakes; a quarter of each (label, source) group is validation; diffusion's 9 training fakes are left out
    assert (result["train_images"], result["val_images"]) == (18 + 9, 6 + 3 + 3)
    assert list(result["auc"]) == [f"stage {i}" for i in range(7)] + ["final", "all"]
    assert set(result["auc"]["stage 0"]) == {"diffusion", "gan", "real"}
    # the bright region is a low-level cue both generators share: stage 0's statistics carry it to the held-out one
    assert result["auc"]["stage 0"]["diffusion"] >= 0.9
    printed = capsys.readouterr().out
    assert "without diffusion" in printed and "diffusion (held out)" in printed and "gan (held out)" not in printed


def test_per_source_auc_is_a_generators_fakes_against_all_reals(two_generators, one_torch_thread):
    import argparse

    from training.data import discover, split_samples

    args = argparse.Namespace(data=[str(two_generators)], holdout="diffusion", checkpoint=None, arch="efficientnet_lite0", weights="none",
                              image_size=32, scale=0, val_fraction=0.25, seed=0, c=0.1, batch_size=32)  # fmt: skip
    captured = {}
    real_probe = feature_probe.probe_scores

    def recording(train_x, train_y, val_x, c=0.1):
        scores = real_probe(train_x, train_y, val_x, c)
        captured.setdefault("scores", scores)  # stage 0's
        return scores

    feature_probe.probe_scores = recording
    try:
        result = feature_probe.run(args)
    finally:
        feature_probe.probe_scores = real_probe
    val = split_samples(discover(str(two_generators)), 0.25, 0)["val"]
    labels, sources = np.array([s.label for s in val]), np.array([s.source for s in val])
    pair = (labels == 0) | (sources == "diffusion")
    assert result["auc"]["stage 0"]["diffusion"] == pytest.approx(roc_auc_score(labels[pair], captured["scores"][pair]))


def test_a_holdout_that_matches_no_source_is_a_clear_error(two_generators, capsys):
    code = feature_probe.main([str(two_generators), "--holdout", "sd21-faces", "--weights", "none", "--image-size", "32"])
    assert code == 2
    assert "--holdout sd21-faces: no training images of that source (sources: diffusion, gan, real)" in capsys.readouterr().err
