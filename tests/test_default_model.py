"""The embedded default model in models/: every version loads, matches its checksums and reproduces
its validation figures on the shared data; `make serve`'s own flags serve the default version."""

import argparse
import shlex
from pathlib import Path

import numpy as np
import pytest

from core import contract as c
from core.images import prepare, read_image

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
SHARED = ROOT.parent / "shared" / "data"  # present on developer machines and CI, not for users
FACES = SHARED / "faces"
MAX_BYTES = 40 * 1024 * 1024  # v9 (two Lite0 at 256 px, fp32, 27 MB) and v12, the same in int8 (8 MB)


def version_dirs() -> list[Path]:
    versions = sorted((p for p in MODELS.glob("*/*") if (p / c.CONTRACT_FILE).is_file()), key=lambda p: int(p.name))
    assert versions and len({p.parent for p in versions}) == 1, f"expected one embedded model under {MODELS}, found {versions}"
    return versions


def make_serve_flags() -> dict:
    """The version settings `make serve` passes to `cyborg serve` (read from the Makefile's serve recipe)."""
    from serving.commands.serve import add_arguments

    recipe = next(line for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith("\t") and "cyborg serve" in line)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(shlex.split(recipe.split("cyborg serve", 1)[1]))
    return {"version_policy": args.version_policy, "default_version": args.default_version}


def default_version_dir() -> Path:
    """The version a request that names none gets from `make serve`: --default-version, else the newest."""
    chosen = make_serve_flags()["default_version"]
    return next(p for p in version_dirs() if int(p.name) == chosen) if chosen else version_dirs()[-1]


@pytest.fixture(scope="module", params=[p.name for p in version_dirs()])
def any_version(request):
    import onnxruntime as ort

    folder = MODELS / version_dirs()[0].parent.name / request.param
    contract = c.read_contract(folder)  # verifies every file's sha256 against model.json
    session = ort.InferenceSession(str(folder / c.ONNX_FILE), providers=["CPUExecutionProvider"])
    return folder, contract, session


def run(session, images: np.ndarray) -> dict[str, np.ndarray]:
    return dict(zip(c.OUTPUT_NAMES, session.run(list(c.OUTPUT_NAMES), {c.INPUT_NAME: images})))


def test_committed_model_is_small_complete_and_labelled_as_proxy_trained(any_version):
    folder, contract, _ = any_version
    total = sum(f.stat().st_size for f in folder.parent.rglob("*") if f.is_file())
    assert total <= MAX_BYTES, f"{folder.parent} holds {total} bytes (limit {MAX_BYTES})"
    assert (folder.parent / c.TRITON_CONFIG_FILE).is_file()
    assert contract.training["saliency"] == "proxy"  # never passed off as human maps
    assert 0.0 < contract.threshold < 1.0


def test_outputs_follow_the_contract(any_version):
    _, contract, session = any_version
    images = np.random.default_rng(0).integers(0, 256, (3, *contract.input_shape), dtype=np.uint8)
    out = run(session, images)
    assert out[c.SCORE_OUTPUT].shape == (3,)
    assert out[c.LOGITS_OUTPUT].shape == (3, 2)
    assert out[c.CAM_OUTPUT].shape == (3, *contract.cam_shape)
    logits = out[c.LOGITS_OUTPUT].astype(np.float64)
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(out[c.SCORE_OUTPUT], (softmax / softmax.sum(1, keepdims=True))[:, c.FAKE_INDEX], atol=1e-5)
    assert out[c.CAM_OUTPUT].min() >= 0.0 and out[c.CAM_OUTPUT].max() <= 1.0 + 1e-6


def validation_samples(contract: c.ModelContract):
    """The validation split recomputed from model.json's training record (folders, fraction, seed)."""
    from training.data import discover, split_samples

    roots = contract.training["data"]["root"]
    folders = [ROOT / root for root in ([roots] if isinstance(roots, str) else roots)]  # as given to `cyborg train` in the repository
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        pytest.skip(f"the default model's training data is not on this machine: {', '.join(missing)} (make default-model writes it)")
    return split_samples(discover(folders if len(folders) > 1 else folders[0]), contract.training["val_fraction"], contract.training["seed"])["val"]


def test_reproduces_its_validation_figures_on_the_held_out_images(any_version):
    """The ONNX model, fed through the server's preprocessing (`core.images.prepare`), reproduces the
    validation AUC recorded at export (an int8 version: its own, measured on the same images), and its
    default operating point keeps the real portraits' false-positive rate within the model card's promise."""
    from sklearn.metrics import roc_auc_score

    _, contract, session = any_version
    val = validation_samples(contract)
    recorded = contract.training["data"]["counts"]["val"]
    assert len(val) == recorded["real"] + recorded["fake"]
    images = np.stack([prepare(read_image(s.path), contract) for s in val])
    scores = np.concatenate([run(session, images[i : i + 32])[c.SCORE_OUTPUT] for i in range(0, len(images), 32)])
    labels = np.array([s.label for s in val])
    recorded_auc = contract.metrics["int8"]["int8_auc"] if contract.precision == "int8" else contract.metrics["validation"]["auc"]
    assert roc_auc_score(labels, scores) == pytest.approx(recorded_auc, abs=0.01)
    called_fake = scores >= contract.threshold
    reals = labels == c.REAL_INDEX
    assert called_fake[reals].mean() <= 0.03  # fpr1 on validation, with room for a single image of drift
    portraits = np.array(["portraits" in s.source for s in val])
    if portraits.any():
        assert called_fake[portraits].mean() <= 0.02


@pytest.mark.skipif(not FACES.is_dir(), reason=f"{FACES} (the shared faces data) is not on this machine")
def test_make_serve_model_answers_detect(tmp_path):
    """What `make serve` serves: the default version scores a real and a fake face; the newest answers when asked."""
    from serving.client import DetectorClient
    from tests.serving_fixtures import RunningServer

    real, fake = sorted((FACES / "real").iterdir())[0], sorted((FACES / "fake").iterdir())[0]
    folder = default_version_dir()
    newest = version_dirs()[-1]
    with RunningServer(MODELS, **make_serve_flags()) as server, DetectorClient(server.address, timeout=60) as client:
        results = [client.detect(str(path), heatmap="overlay") for path in (real, fake)]
        asked = client.detect(str(real), version=int(newest.name))
    assert asked.version == int(newest.name)
    for result in results:
        assert result.model == folder.parent.name and result.version == int(folder.name)
        assert 0.0 <= result.score <= 1.0 and result.label in c.CLASS_NAMES
        assert result.heatmap_png.startswith(b"\x89PNG")
