"""The embedded default model in models/: it loads, matches its checksums and separates faces."""

from pathlib import Path

import numpy as np
import pytest

from core import contract as c
from core.images import read_image, to_model_input

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
FACES = ROOT.parent / "shared" / "data" / "faces"  # present on developer machines and CI, not for users
MAX_BYTES = 30 * 1024 * 1024


def default_version_dir() -> Path:
    versions = [p for p in MODELS.glob("*/*") if (p / c.CONTRACT_FILE).is_file()]
    assert len(versions) == 1, f"expected exactly one embedded model version under {MODELS}, found {versions}"
    return versions[0]


@pytest.fixture(scope="module")
def model():
    import onnxruntime as ort

    folder = default_version_dir()
    contract = c.read_contract(folder)  # verifies every file's sha256 against model.json
    session = ort.InferenceSession(str(folder / c.ONNX_FILE), providers=["CPUExecutionProvider"])
    return folder, contract, session


def run(session, images: np.ndarray) -> dict[str, np.ndarray]:
    return dict(zip(c.OUTPUT_NAMES, session.run(list(c.OUTPUT_NAMES), {c.INPUT_NAME: images})))


def test_committed_model_is_small_complete_and_labelled_as_proxy_trained(model):
    folder, contract, _ = model
    total = sum(f.stat().st_size for f in folder.parent.rglob("*") if f.is_file())
    assert total <= MAX_BYTES, f"{folder.parent} holds {total} bytes (limit {MAX_BYTES})"
    assert (folder.parent / c.TRITON_CONFIG_FILE).is_file()
    assert contract.training["saliency"] == "proxy"  # never passed off as human maps
    assert 0.0 < contract.threshold < 1.0


def test_outputs_follow_the_contract(model):
    _, contract, session = model
    images = np.random.default_rng(0).integers(0, 256, (3, *contract.input_shape), dtype=np.uint8)
    out = run(session, images)
    assert out[c.SCORE_OUTPUT].shape == (3,)
    assert out[c.LOGITS_OUTPUT].shape == (3, 2)
    assert out[c.CAM_OUTPUT].shape == (3, *contract.cam_shape)
    logits = out[c.LOGITS_OUTPUT].astype(np.float64)
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(out[c.SCORE_OUTPUT], (softmax / softmax.sum(1, keepdims=True))[:, c.FAKE_INDEX], atol=1e-5)
    assert out[c.CAM_OUTPUT].min() >= 0.0 and out[c.CAM_OUTPUT].max() <= 1.0 + 1e-6


@pytest.mark.skipif(not FACES.is_dir(), reason=f"{FACES} (the shared faces data) is not on this machine")
def test_reproduces_its_validation_auc_on_the_held_out_faces(model):
    """The validation split is recomputed from the seed in model.json; the ONNX model, fed through the
    server's preprocessing, must reproduce the AUC recorded at training time on those faces."""
    from sklearn.metrics import roc_auc_score

    from training.data import discover, split_samples

    _, contract, session = model
    val = split_samples(discover(FACES), contract.training["val_fraction"], contract.training["seed"])["val"]
    recorded = contract.training["data"]["counts"]["val"]
    assert len(val) == recorded["real"] + recorded["fake"]
    images = np.stack([to_model_input(read_image(s.path), contract.input_height, contract.input_width) for s in val])
    scores = np.concatenate([run(session, images[i : i + 32])[c.SCORE_OUTPUT] for i in range(0, len(images), 32)])
    labels = np.array([s.label for s in val])
    auc = roc_auc_score(labels, scores)
    assert auc == pytest.approx(contract.metrics["validation"]["auc"], abs=0.01)
    accuracy = float(((scores >= contract.threshold) == labels).mean())
    assert accuracy >= 0.7


@pytest.mark.skipif(not FACES.is_dir(), reason=f"{FACES} (the shared faces data) is not on this machine")
def test_make_serve_model_answers_detect(tmp_path):
    """What `make serve` serves: the server's default model scores a real and a fake face."""
    from serving.client import DetectorClient
    from tests.serving_fixtures import RunningServer

    real, fake = sorted((FACES / "real").iterdir())[0], sorted((FACES / "fake").iterdir())[0]
    folder = default_version_dir()
    with RunningServer(MODELS) as server, DetectorClient(server.address, timeout=60) as client:
        results = [client.detect(str(path), heatmap="overlay") for path in (real, fake)]
    for result in results:
        assert result.model == folder.parent.name and result.version == int(folder.name)
        assert 0.0 <= result.score <= 1.0 and result.label in c.CLASS_NAMES
        assert result.heatmap_png.startswith(b"\x89PNG")
