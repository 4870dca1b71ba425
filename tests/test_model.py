"""The CAM classifier contract, over every documented architecture."""

import pytest
import torch

from training.model import ARCHITECTURES, cam_grid, create_classifier, normalised_cam, select_cam

EXPECTED_GRID = {"densenet121": 7, "resnet50": 7, "inception_v3": 8, "xception": 10, "efficientnet_lite0": 7, "efficientnet_lite0_s2": 28}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_logits_are_the_pooled_class_maps(arch):
    """The logits equal timm's own head on the same features, so the CAM is the map the decision uses."""
    torch.manual_seed(0)
    model = create_classifier(arch).eval()
    size = ARCHITECTURES[arch]
    images = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8)
    with torch.no_grad():
        out = model(images)
        reference = model.backbone.forward_head(model.backbone.forward_features(model.normalise(images)))
    torch.testing.assert_close(out.logits, reference, rtol=1e-4, atol=1e-4)
    if arch in EXPECTED_GRID:
        assert tuple(out.class_maps.shape) == (1, 2, EXPECTED_GRID[arch], EXPECTED_GRID[arch])


def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    model = create_classifier("test_resnet").train()
    out = model(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    (out.logits.sum() + select_cam(out.class_maps, out.logits.argmax(1)).sum()).backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_cam_matches_hand_computation():
    torch.manual_seed(0)
    model = create_classifier("test_resnet").eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        out = model(images)
        features = model.backbone.forward_features(model.normalise(images))
    weight = model.classifier.weight
    for b in range(2):
        k = int(out.logits[b].argmax())
        raw = (weight[k][:, None, None] * features[b]).sum(0)
        expected = (raw - raw.min()) / (raw.max() - raw.min())
        torch.testing.assert_close(select_cam(out.class_maps, out.logits.argmax(1))[b], expected, rtol=1e-4, atol=1e-5)
    assert cam_grid(model, 64) == (2, 2)


def test_constant_map_normalises_to_zeros_not_nan():
    maps = torch.stack([torch.full((3, 3), 5.0), torch.arange(9.0).view(3, 3)])
    cam = normalised_cam(maps)
    assert not torch.isnan(cam).any()
    assert cam[0].abs().sum() == 0 and cam[1].min() == 0 and cam[1].max() == 1


def test_models_without_an_exact_cam_are_refused():
    with pytest.raises(ValueError, match="not one nn.Linear|no exact CAM"):
        create_classifier("mobilenetv3_small_050")
    with pytest.raises(ValueError, match="unknown architecture"):
        create_classifier("no_such_net")
