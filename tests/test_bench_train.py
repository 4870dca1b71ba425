"""`cyborg bench train`: the CYBORG step uses one forward, the authors' reference two, same loss."""

import json

import pytest
import torch

from cyborg.cli import main
from benchmarks.commands.bench_train import authors_step
from training.config import TrainConfig
from training.guidance import get_method
from training.model import create_classifier



pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture
def counted_model():
    torch.manual_seed(0)
    model = create_classifier("cyborg_local_tiny").eval()  # eval: both of the authors' forwards agree
    calls = []
    forward_features = model.backbone.forward_features
    model.backbone.forward_features = lambda x: calls.append(1) or forward_features(x)
    return model, calls


def test_cyborg_uses_one_forward_and_matches_the_authors_two_forward_loss(counted_model):
    model, calls = counted_model
    batch = {
        "image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8),
        "label": torch.tensor([0, 1, 1, 0]),
        "saliency": torch.rand(4, 4, 4),
        "has_saliency": torch.tensor([True, True, False, True]),
    }
    config = TrainConfig(alpha=0.5)
    counts = {}
    results = {}
    for name, method in (("ce", get_method("ce")), ("cyborg", get_method("cyborg")), ("authors", authors_step)):
        calls.clear()
        results[name] = method(model, batch, config)
        counts[name] = len(calls)
    assert counts == {"ce": 1, "cyborg": 1, "authors": 2}
    torch.testing.assert_close(results["authors"].loss, results["cyborg"].loss, rtol=1e-5, atol=1e-6)
    assert results["cyborg"].guidance_term > 0


def test_bench_prints_json_with_ratios(capsys):
    argv = ["bench", "train", "--archs", "cyborg_local_tiny", "--image-size", "32", "--batch-size", "4", "--steps", "2", "--device", "cpu", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    (row,) = report["results"]
    assert row["arch"] == "cyborg_local_tiny" and row["cam_grid"] == [4, 4] and report["batch_size"] == 4
    for way in ("ce", "cyborg", "authors"):
        assert row[f"{way}_s"] > 0
    assert row["cyborg_vs_ce"] == pytest.approx(row["cyborg_s"] / row["ce_s"])
