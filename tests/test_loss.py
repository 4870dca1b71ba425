"""The CYBORG loss and the guidance registry, checked against hand computations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.config import GUIDANCE_METHODS, TrainConfig
from training.guidance import METHODS, get_method, register
from training.loss import cam_for_loss, cyborg_loss
from training.model import create_classifier



pytestmark = pytest.mark.usefixtures("one_torch_thread")

def hand_cam(features: np.ndarray, weight: np.ndarray, cls: int) -> np.ndarray:
    """sum_c w[cls, c] * F[c, i, j] with explicit loops, then min-max to [0, 1]."""
    channels, height, width = features.shape
    cam = np.zeros((height, width))
    for i in range(height):
        for j in range(width):
            cam[i, j] = sum(weight[cls, c] * features[c, i, j] for c in range(channels))
    return (cam - cam.min()) / (cam.max() - cam.min())


@pytest.mark.parametrize("cam_class", ["predicted", "true"])
def test_loss_cam_is_the_weight_row_times_the_final_features(cam_class):
    torch.manual_seed(0)
    model = create_classifier("cyborg_local_tiny").eval()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 1])
    with torch.no_grad():
        out = model(images)
        features = model.backbone.forward_features(model.normalise(images)).double().numpy()
    weight = model.classifier.weight.detach().double().numpy()
    cam = cam_for_loss(out.class_maps, out.logits, labels, cam_class)
    classes = out.logits.argmax(1) if cam_class == "predicted" else labels
    for b in range(3):
        np.testing.assert_allclose(cam[b].numpy(), hand_cam(features[b], weight, int(classes[b])), atol=1e-5)


def hand_case():
    """Three samples with 2x2 class maps; the third has no human map (its map is NaN on purpose)."""
    logits = torch.tensor([[2.0, 0.5], [0.1, 1.1], [0.3, -0.2]], requires_grad=True)
    class_maps = torch.tensor(
        [
            [[[1.0, 3.0], [2.0, 5.0]], [[0.0, 1.0], [1.0, 0.0]]],
            [[[4.0, 4.0], [0.0, 2.0]], [[2.0, 6.0], [4.0, 10.0]]],
            [[[1.0, 2.0], [3.0, 4.0]], [[9.0, 9.0], [9.0, 9.0]]],
        ],
        requires_grad=True,
    )
    labels = torch.tensor([0, 0, 1])
    saliency = torch.tensor([[[0.0, 0.0], [0.0, 1.0]], [[1.0, 0.5], [0.0, 0.0]], [[math.nan] * 2] * 2])
    has = torch.tensor([True, True, False])
    return logits, class_maps, labels, saliency, has


def test_loss_equals_the_formula_by_hand():
    logits, class_maps, labels, saliency, has = hand_case()
    terms = cyborg_loss(logits, class_maps, labels, saliency, has, alpha=0.3)
    # cross-entropy by hand
    ce = np.mean([math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(logits.tolist(), labels.tolist())])
    # predicted classes: 0, 1 (sample 3 has no map). Normalised CAMs by hand:
    cam0 = np.array([[0.0, 0.5], [0.25, 1.0]])  # (m - 1) / 4 of class 0's map
    cam1 = np.array([[0.0, 0.5], [0.25, 1.0]])  # (m - 2) / 8 of class 1's map
    mse0 = np.mean((cam0 - np.array([[0.0, 0.0], [0.0, 1.0]])) ** 2)
    mse1 = np.mean((cam1 - np.array([[1.0, 0.5], [0.0, 0.0]])) ** 2)
    saliency_term = (mse0 + mse1) / 2  # averaged over the two samples that have a map
    assert terms.ce.item() == pytest.approx(ce, abs=1e-6)
    assert terms.saliency.item() == pytest.approx(saliency_term, abs=1e-6)
    assert terms.total.item() == pytest.approx(0.3 * ce + 0.7 * saliency_term, abs=1e-6)
    terms.total.backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(class_maps.grad).all()
    # the sample without a map reaches the loss through CE only: no gradient into its class maps
    assert class_maps.grad[2].abs().sum() == 0
    # the predicted class's map gets the saliency gradient, the other class's map none
    assert class_maps.grad[0, 0].abs().sum() > 0 and class_maps.grad[0, 1].abs().sum() == 0


def test_true_class_cam_option_uses_the_label():
    logits, class_maps, labels, saliency, has = hand_case()
    terms = cyborg_loss(logits, class_maps, labels, saliency, has, alpha=0.0, cam_class="true")
    cam1 = (class_maps[1, 0] - 0.0) / 4.0  # label 0: class 0's map [[4,4],[0,2]] -> (m - 0) / 4
    mse0 = np.mean((np.array([[0.0, 0.5], [0.25, 1.0]]) - np.array([[0.0, 0.0], [0.0, 1.0]])) ** 2)
    mse1 = torch.mean((cam1 - saliency[1]) ** 2).item()
    assert terms.saliency.item() == pytest.approx((mse0 + mse1) / 2, abs=1e-6)


def test_alpha_one_is_plain_cross_entropy_and_no_maps_gives_zero_term():
    logits, class_maps, labels, saliency, has = hand_case()
    plain = F.cross_entropy(logits, labels)
    assert cyborg_loss(logits, class_maps, labels, saliency, has, alpha=1.0).total.item() == plain.item()
    none = cyborg_loss(logits, class_maps, labels, saliency, torch.zeros(3, dtype=torch.bool), alpha=0.5)
    assert none.saliency.item() == 0.0
    assert none.total.item() == pytest.approx(0.5 * plain.item())


def test_constant_cam_gives_no_nan():
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    class_maps = torch.full((2, 2, 3, 3), 0.7, requires_grad=True)  # constant: min == max
    saliency = torch.rand(2, 3, 3)
    terms = cyborg_loss(logits, class_maps, torch.tensor([0, 1]), saliency, torch.tensor([True, True]), alpha=0.5)
    terms.total.backward()
    assert torch.isfinite(terms.total) and torch.isfinite(class_maps.grad).all()
    assert terms.saliency.item() == pytest.approx(torch.mean(saliency**2).item(), abs=1e-6)  # CAM of zeros


def test_map_of_another_size_is_refused():
    logits, class_maps, labels, _, has = hand_case()
    with pytest.raises(ValueError, match="CAM grid"):
        cyborg_loss(logits, class_maps, labels, torch.zeros(3, 7, 7), has, alpha=0.5)


def test_registry_matches_config_names_and_refuses_duplicates():
    assert sorted(METHODS) == sorted(GUIDANCE_METHODS)
    with pytest.raises(ValueError, match="already registered"):
        register("ce")(lambda model, batch, config: None)
    with pytest.raises(ValueError, match="registered: ce, cyborg"):
        get_method("nope")


def test_guidance_methods_on_a_batch():
    torch.manual_seed(0)
    model = create_classifier("cyborg_local_tiny")
    batch = {
        "image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8),
        "label": torch.tensor([0, 1, 0, 1]),
        "saliency": torch.rand(4, 4, 4),
        "has_saliency": torch.tensor([True, False, True, True]),
    }
    model.eval()  # same batch-norm statistics for every call
    ce = get_method("ce")(model, batch, TrainConfig(guidance="ce"))
    at_one = get_method("cyborg")(model, batch, TrainConfig(alpha=1.0))
    half = get_method("cyborg")(model, batch, TrainConfig(alpha=0.5))
    assert ce.loss.item() == at_one.loss.item() and ce.guidance_term.item() == 0.0
    assert half.loss.item() == pytest.approx(0.5 * half.ce.item() + 0.5 * half.guidance_term.item())
    assert half.guidance_term.item() > 0 and half.logits.shape == (4, 2)
