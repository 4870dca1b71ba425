"""benchmarks.compare_models: versions side by side from the repository alone, CAMs against maps."""

import dataclasses

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from benchmarks.compare_models import compare, main
from core import contract as c
from core.images import prepare, read_image
from engines.runtime import OnnxRuntimeBackend
from tests.datasets import make_plain_dataset
from tests.serving_fixtures import write_model_version
from training.data import discover, split_samples
from training.intervals import auc_difference_interval, auc_interval
from training.saliency import prepare_map

SEED, VAL_FRACTION = 0, 0.5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """40-px faces, larger than the 32-px models below, with maps of two bright stripes: one in the
    4-px border a centre 32-px crop drops, one inside it (so the cut changes the map on the grid)."""
    data = make_plain_dataset(tmp_path_factory.mktemp("compare"), n_real=10, n_fake=10, size=40)
    stripes = np.zeros((40, 40), dtype=np.uint8)
    stripes[:, 0:4] = stripes[:, 20:24] = 255
    for path in (data / "maps").iterdir():
        Image.fromarray(stripes).save(path)
    return data


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    """v1 resizes the whole picture to 32 px (no scale); v2 keeps it at scale 40 and takes the centre 32."""
    root = tmp_path_factory.mktemp("repo")
    write_model_version(root, "tiny", 1, size=32)
    folder = write_model_version(root, "tiny", 2, size=32)
    c.write_contract(folder, dataclasses.replace(c.read_contract(folder), scale=40))
    return root / "tiny"


def validation(data):
    return split_samples(discover(str(data), heatmaps=str(data / "maps")), VAL_FRACTION, SEED)["val"]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def expected_pearson(folder, samples, region: tuple[int, int, int, int]) -> float:
    """The mean per-image Pearson of the version's CAM with its map cut to `region` and reduced to the grid."""
    contract = c.read_contract(folder)
    backend = OnnxRuntimeBackend(folder / c.ONNX_FILE, device="cpu")
    images = np.stack([prepare(read_image(s.path), contract) for s in samples])
    cams = backend.run(images)[c.CAM_OUTPUT]
    grid = (contract.cam_height, contract.cam_width)
    values = []
    for cam, sample in zip(cams, samples):
        cut = np.asarray(Image.open(sample.map_path).convert("F").crop(region), dtype=np.float32)
        values.append(pearson(cam, prepare_map(cut, grid)))
    return float(np.nanmean(values))


def test_reports_auc_per_source_and_cam_agreement_on_each_versions_input_region(data, repository):
    samples = validation(data)
    report = compare([repository / "1", repository / "2"], [str(data)], SEED, VAL_FRACTION, "clean,blur1",
                     rounds=1, heatmaps=str(data / "maps"))  # fmt: skip
    labels = np.array([s.label for s in samples])
    assert report["images"] == len(samples) and set(report["models"]) == {"tiny v1", "tiny v2"}
    for version in ("1", "2"):
        folder = repository / version
        contract = c.read_contract(folder)
        backend = OnnxRuntimeBackend(folder / c.ONNX_FILE, device="cpu")
        scores = backend.run(np.stack([prepare(read_image(s.path), contract) for s in samples]))[c.SCORE_OUTPUT]
        clean = report["models"][f"tiny v{version}"]["clean"]
        assert clean["auc"] == pytest.approx(roc_auc_score(labels, scores))
        assert set(report["models"][f"tiny v{version}"]) == {"clean", "blur1"}
        assert clean["cam_agreement"]["n_maps"] == len(samples)
        assert clean["auc_ci"] == list(auc_interval(labels, scores))
        if version == "1":
            first = scores
        else:  # the second version's AUC against the first's, on the same images and resamples
            assert clean["auc_vs_first"] == list(auc_difference_interval(labels, scores, first))
    assert "auc_vs_first" not in report["models"]["tiny v1"]["clean"]
    # v1 sees the whole 40-px picture; v2 its centre 32 px, so its maps are cut there before reduction.
    whole, centre = (0, 0, 40, 40), (4, 4, 36, 36)
    v1, v2 = (report["models"][f"tiny v{v}"]["clean"]["cam_agreement"]["pearson"] for v in ("1", "2"))
    assert v1 == pytest.approx(expected_pearson(repository / "1", samples, whole), abs=1e-4)
    assert v2 == pytest.approx(expected_pearson(repository / "2", samples, centre), abs=1e-4)
    assert abs(v2 - expected_pearson(repository / "2", samples, whole)) > 1e-3  # the cut matters


def test_without_heatmaps_no_cam_agreement(data, repository):
    report = compare([repository / "1"], [str(data)], SEED, VAL_FRACTION, "clean", rounds=1)
    assert "cam_agreement" not in report["models"]["tiny v1"]["clean"]


def test_missing_heatmaps_folder_is_one_clear_line(data, repository, tmp_path, capsys):
    missing = tmp_path / "no-maps"
    assert main([str(repository / "1"), "--data", str(data), "--heatmaps", str(missing), "--rounds", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"compare_models: error: --heatmaps {missing}: folder not found"
