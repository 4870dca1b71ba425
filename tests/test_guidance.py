"""Guidance methods (cam_diff, rrr, mask, consistency) against their formulas, and the decoy set."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks import decoy
from training.config import TrainConfig
from training.guidance import get_method
from training.guidance_methods import (
    input_gradient_penalty,
    logit_difference_cam,
    mask_non_salient,
    prediction_kl,
    upsample_saliency,
)
from training.loss import cyborg_loss, saliency_mse
from training.model import create_classifier


class PixelModel(torch.nn.Module):
    """Logits [0, z] with z = sum(weight * image / 255): d/dx of sum_k log p_k is (1 - 2 sigmoid(z)) * weight."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone())
        self.register_buffer("pixel_mean", torch.full((1, 3, 1, 1), 100.0))
        self.seen = None

    def forward(self, images):
        self.seen = images.detach().clone()
        z = (self.weight * images.float() / 255.0).sum(dim=(1, 2, 3))
        logits = torch.stack([torch.zeros_like(z), z], dim=1)
        return types.SimpleNamespace(logits=logits, class_maps=None)


def pixel_batch(saliency: torch.Tensor, has=None) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    count = saliency.shape[0]
    return {
        "image": torch.randint(0, 256, (count, 3, 4, 4), generator=generator, dtype=torch.uint8),
        "label": torch.arange(count) % 2,
        "saliency": saliency,
        "has_saliency": torch.ones(count, dtype=torch.bool) if has is None else has,
    }


def test_logit_difference_cam_by_hand():
    maps = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]], [[3.0, 1.0], [0.0, 3.0]]]])  # real, fake maps
    diff = torch.tensor([[3.0, 0.0], [-2.0, 0.0]])  # fake - real
    as_fake = logit_difference_cam(maps, torch.tensor([1]))
    as_real = logit_difference_cam(maps, torch.tensor([0]))
    assert torch.allclose(as_fake[0], (diff + 2.0) / 5.0)
    assert torch.allclose(as_real[0], (-diff + 3.0) / 5.0)


def test_cam_diff_step_is_its_formula():
    torch.manual_seed(0)
    model = create_classifier("cyborg_local_tiny").eval()
    batch = {
        "image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8),
        "label": torch.tensor([0, 1, 0, 1]),
        "saliency": torch.rand(4, 4, 4),
        "has_saliency": torch.tensor([True, False, True, True]),
    }
    config = TrainConfig(guidance="cam_diff", alpha=0.3, cam_class="true")
    result = get_method("cam_diff")(model, batch, config)
    out = model(batch["image"])
    ce = F.cross_entropy(out.logits, batch["label"])
    term = saliency_mse(logit_difference_cam(out.class_maps, batch["label"]), batch["saliency"], batch["has_saliency"])
    assert result.loss.item() == pytest.approx((0.3 * ce + 0.7 * term).item(), rel=1e-5)
    assert result.guidance_term.item() == pytest.approx(term.item(), rel=1e-5) and term.item() > 0


def test_rrr_penalty_is_the_masked_squared_input_gradient():
    weight = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    saliency = torch.zeros(2, 2, 2)
    saliency[:, 0, 0] = 1.0  # one annotated cell of 2x2 -> upsampled to 4x4
    batch = pixel_batch(saliency)
    model = PixelModel(weight)
    result = get_method("rrr")(model, batch, TrainConfig(guidance="rrr", alpha=0.5, guidance_weight=2.0))
    z = (weight * batch["image"].float() / 255.0).sum(dim=(1, 2, 3))
    gradients = (1.0 - 2.0 * torch.sigmoid(z)).view(-1, 1, 1, 1) * weight
    outside = 1.0 - upsample_saliency(saliency, (4, 4)).unsqueeze(1)
    expected = 2.0 * ((outside * gradients) ** 2).sum(dim=(1, 2, 3)).mean()
    assert result.guidance_term.item() == pytest.approx(expected.item(), rel=1e-5)
    ce = F.cross_entropy(torch.stack([torch.zeros_like(z), z], dim=1), batch["label"])
    assert result.loss.item() == pytest.approx((0.5 * ce + 0.5 * expected).item(), rel=1e-5)


def test_rrr_penalty_is_zero_when_the_evidence_lies_inside_the_map_and_reaches_parameters():
    inside = torch.zeros(1, 3, 4, 4)
    inside[..., :2, :2] = 1.0
    saliency = torch.zeros(2, 2, 2)
    saliency[:, 0, 0] = 1.0
    full = torch.ones(2, 2, 2)
    model = PixelModel(inside * 3.0)
    # the upsampled 2x2 map is soft at its edge, so only a map of ones is exactly "all inside"
    assert get_method("rrr")(model, pixel_batch(full), TrainConfig(guidance="rrr")).guidance_term.item() == 0.0
    outside_model = PixelModel((1.0 - inside) * 3.0)
    assert get_method("rrr")(outside_model, pixel_batch(saliency), TrainConfig(guidance="rrr")).guidance_term.item() > 0
    # double backward: the penalty alone (alpha = 0) moves the parameters of a real network
    torch.manual_seed(0)
    net = create_classifier("cyborg_local_tiny")
    batch = {
        "image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8),
        "label": torch.tensor([0, 1, 0, 1]),
        "saliency": torch.zeros(4, 4, 4),
        "has_saliency": torch.ones(4, dtype=torch.bool),
    }
    result = get_method("rrr")(net, batch, TrainConfig(guidance="rrr", alpha=0.0))
    result.loss.backward()
    conv = net.backbone.features[0][0].weight.grad
    assert result.loss.item() > 0 and conv is not None and torch.isfinite(conv).all() and conv.abs().sum() > 0


def test_input_gradient_penalty_ignores_samples_without_a_map():
    gradients = torch.ones(2, 1, 2, 2)
    penalty = input_gradient_penalty(gradients, torch.zeros(2, 2, 2), torch.tensor([True, False]))
    assert penalty.item() == pytest.approx(4.0)
    assert input_gradient_penalty(gradients, torch.zeros(2, 2, 2), torch.tensor([False, False])).item() == 0.0


def test_masking_keeps_salient_pixels_and_greys_the_rest():
    images = torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8)
    saliency = torch.zeros(3, 4, 4)
    saliency[:, :2] = 1.0
    fill = torch.full((1, 3, 1, 1), 100.0)
    masked = mask_non_salient(images, saliency, torch.tensor([True, True, False]), fill)
    assert torch.equal(masked[:2, :, :2], images[:2, :, :2].float())  # salient pixels untouched
    assert torch.all(masked[:2, :, 2:] == 100.0)  # the rest is the fill
    assert torch.equal(masked[2], images[2].float())  # no map: unchanged
    # the mask step trains on exactly that image (maps at the grid are upsampled first)
    model = PixelModel(torch.zeros(1, 3, 4, 4))
    batch = pixel_batch(torch.ones(2, 2, 2))
    get_method("mask")(model, batch, TrainConfig(guidance="mask"))
    assert torch.equal(model.seen, batch["image"].float())
    get_method("mask")(model, pixel_batch(torch.zeros(2, 2, 2)), TrainConfig(guidance="mask"))
    assert torch.all(model.seen == 100.0)


def test_mask_cyborg_is_the_cyborg_loss_on_the_masked_image():
    torch.manual_seed(0)
    model = create_classifier("cyborg_local_tiny").eval()
    saliency = torch.zeros(2, 4, 4)
    saliency[:, 1:3, 1:3] = 1.0
    batch = {
        "image": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
        "label": torch.tensor([0, 1]),
        "saliency": saliency,
        "has_saliency": torch.tensor([True, True]),
    }
    config = TrainConfig(guidance="mask_cyborg", alpha=0.5)
    result = get_method("mask_cyborg")(model, batch, config)
    masked = mask_non_salient(batch["image"], upsample_saliency(saliency, (32, 32)), batch["has_saliency"], model.pixel_mean)
    out = model(masked)
    expected = cyborg_loss(out.logits, out.class_maps, batch["label"], saliency, batch["has_saliency"], 0.5)
    assert result.loss.item() == pytest.approx(expected.total.item(), rel=1e-5)
    assert result.guidance_term.item() == pytest.approx(expected.saliency.item(), rel=1e-5) and expected.saliency.item() > 0


def test_swap_keeps_salient_pixels_and_takes_the_rest_from_a_batch_partner():
    model = PixelModel(torch.zeros(1, 3, 4, 4))
    saliency = torch.zeros(6, 2, 2)
    saliency[:, 0, :] = 1.0  # top row of cells: the top half after upsampling (soft in between)
    batch = pixel_batch(saliency)
    torch.manual_seed(0)
    get_method("swap")(model, batch, TrainConfig(guidance="swap"))
    seen, images = model.seen, batch["image"].float()
    assert torch.equal(seen[:, :, 0], images[:, :, 0])  # fully salient row untouched
    partners = [next(j for j in range(6) if torch.equal(seen[i, :, 3], images[j, :, 3])) for i in range(6)]
    assert sorted(partners) == list(range(6))  # every bottom row comes from one image: a permutation


def test_consistency_is_ce_plus_kl_to_the_masked_prediction():
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    masked = torch.tensor([[0.5, 0.5], [0.0, 0.0]])
    p = logits.softmax(1)
    expected = (p * (p.log() - masked.softmax(1).log())).sum(1).mean()
    assert prediction_kl(logits, masked, torch.tensor([True, True])).item() == pytest.approx(expected.item(), rel=1e-6)
    assert prediction_kl(logits, logits, torch.tensor([True, True])).item() == pytest.approx(0.0, abs=1e-7)
    weight = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    model = PixelModel(weight)
    saliency = torch.zeros(2, 2, 2)
    batch = pixel_batch(saliency)
    result = get_method("consistency")(model, batch, TrainConfig(guidance="consistency", alpha=0.5, guidance_weight=3.0))
    z = (weight * batch["image"].float() / 255.0).sum(dim=(1, 2, 3))
    z_masked = (weight * 100.0 / 255.0).sum().expand(2)  # all pixels grey
    both = [torch.stack([torch.zeros_like(v), v], dim=1) for v in (z, z_masked)]
    ce = F.cross_entropy(both[0], batch["label"])
    kl = prediction_kl(both[0], both[1], batch["has_saliency"])
    assert result.loss.item() == pytest.approx((0.5 * ce + 0.5 * 3.0 * kl).item(), rel=1e-5)


def synthetic_faces(count: int, size: int, seed: int) -> torch.Tensor:
    """Smooth random colour fields: stand-ins for face photos (only the cue positions matter)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=generator) * 120 + 60
    images = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    images = images + torch.randn(count, 3, size, size, generator=generator) * 6
    return images.clamp(0, 255).round().to(torch.uint8)


def test_decoy_set_puts_the_cue_in_the_regions_and_the_decoy_in_the_corner():
    faces = synthetic_faces(20, 32, 0)
    spec = decoy.DecoySpec(cue_amplitude=10.0)
    sets = decoy.build_decoy_set(faces, (4, 4), spec, seed=0)
    train, test, clean = sets["decoy"]["train"], sets["decoy"]["test"], sets["clean"]["train"]
    assert len(train) == 24 and len(sets["decoy"]["val"]) == 6 and len(test) == 10
    assert torch.equal(train.decoy_class, train.label)  # agrees in training
    assert (clean.decoy_class == -1).all()
    half = len(clean) // 2
    difference = (clean.image[half:].float() - clean.image[:half].float()).abs().sum(dim=1)  # fake - real copies
    inside = torch.from_numpy(decoy.part_mask(32)) > 0
    assert difference[:, ~inside].max() == 0 and difference[:, inside].mean() > 5
    rows, cols = decoy.decoy_box(32, spec)
    corner = train.image[:, :, rows, cols].float().mean(dim=(1, 2, 3))
    assert (corner[train.label == 1].min() > corner[train.label == 0].max())
    assert train.saliency.shape == (24, 4, 4) and train.saliency.max() == 1.0 and train.saliency[:, 0, 0].max() == 0.0


@pytest.mark.timeout(120)
def test_recommended_method_ignores_the_decoy_where_ce_follows_it():
    torch.set_num_threads(1)
    faces = synthetic_faces(60, 32, 1)
    sets = decoy.build_decoy_set(faces, (4, 4), decoy.DecoySpec(cue_amplitude=12.0), seed=0)
    results = {}
    for method in ("ce", "swap"):
        config = TrainConfig(arch="cyborg_local_tiny", weights="none", guidance=method, lr=0.05, batch_size=24)
        trained = decoy.train_method(sets["decoy"]["train"], config, epochs=10, seed=0)
        results[method] = decoy.measure(trained.model, sets["decoy"]["val"], sets["decoy"]["test"])
    assert results["ce"]["follows_decoy"] > 0.9 and results["ce"]["test_auc"] < 0.85  # CE decides from the corner
    assert results["swap"]["test_auc"] > 0.95 and results["swap"]["follows_decoy"] < 0.75
    assert results["swap"]["test_auc"] > results["ce"]["test_auc"] + 0.1
    assert results["swap"]["cam_inside"] > 2 * results["ce"]["cam_inside"]


def test_bench_guidance_command(tmp_path, capsys):
    import json

    from PIL import Image

    from cyborg.cli import main

    faces = tmp_path / "faces"
    faces.mkdir()
    for index, image in enumerate(synthetic_faces(12, 32, 3)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(faces / f"{index:03d}.png")
    out = tmp_path / "out"
    argv = ["bench", "guidance", str(faces), "--methods", "ce,mask", "--seeds", "0", "--epochs", "1", "--image-size", "32",
            "--arch", "cyborg_local_tiny", "--batch-size", "4", "--json", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["summary"]) == {"ce", "mask"} and result["images"]["decoy"] == {"train": 14, "val": 4, "test": 6}
    assert result["runs"]["ce"][0]["step_ratio"] == 1.0 and result["runs"]["ce"][0]["clean_gap"] == 0.0
    mask_run = result["runs"]["mask"][0]
    assert mask_run["clean_gap"] == pytest.approx(mask_run["clean_val_auc"] - result["runs"]["ce"][0]["clean_val_auc"])
    assert 0.0 <= result["summary"]["mask"]["follows_decoy"]["mean"] <= 1.0
    assert json.loads((out / "results.json").read_text())["cam_grid"] == [4, 4]
    assert (out / "cams.png").stat().st_size > 0
    assert main(["bench", "guidance", str(faces), "--methods", "ce,nope"]) == 2
    assert "unknown nope" in capsys.readouterr().err
    assert main(["bench", "guidance", str(tmp_path / "missing")]) == 2


def test_hard_edges_keep_or_replace_every_pixel():
    saliency = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    soft = upsample_saliency(saliency, (8, 8))
    hard = upsample_saliency(saliency, (8, 8), "hard")
    assert ((soft > 0) & (soft < 1)).any()  # bilinear: a blended band
    assert set(hard.unique().tolist()) == {0.0, 1.0} and torch.equal(hard, (soft >= 0.5).float())
    with pytest.raises(ValueError, match="mask edge"):
        upsample_saliency(saliency, (8, 8), "blurry")
    # swap with hard edges: every pixel is the image's own or its partner's, never a blend of the two
    model = PixelModel(torch.zeros(1, 3, 4, 4))
    cells = torch.zeros(6, 2, 2)
    cells[:, 0, 0] = 1.0
    batch = pixel_batch(cells)
    torch.manual_seed(0)
    get_method("swap")(model, batch, TrainConfig(guidance="swap", mask_edge="hard"))
    kept = upsample_saliency(cells, (4, 4), "hard")[0].bool()
    images = batch["image"].float()
    assert torch.equal(model.seen[:, :, kept], images[:, :, kept])
    for seen in model.seen:  # the rest is one partner's pixels, exactly
        assert any(torch.equal(seen[:, ~kept], other[:, ~kept]) for other in images)


def test_mask_with_hard_edges_leaves_no_corner_decoy_pixel():
    faces = synthetic_faces(8, 32, 4)
    spec = decoy.DecoySpec()
    split = decoy.build_decoy_set(faces, (4, 4), spec, seed=0)["decoy"]["train"]
    model = PixelModel(torch.zeros(1, 3, 32, 32))
    get_method("mask")(model, split.batch(torch.arange(len(split))), TrainConfig(guidance="mask", mask_edge="hard"))
    rows, cols = decoy.decoy_box(32, spec)
    assert torch.all(model.seen[:, :, rows, cols] == 100.0)  # the whole corner patch is the fill


def test_freeze_bn_keeps_the_running_statistics_while_weights_learn():
    from training.trainer import set_train_mode

    batch = {
        "image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(5)),
        "label": torch.tensor([0, 1, 0, 1]),
        "saliency": torch.ones(4, 4, 4),
        "has_saliency": torch.ones(4, dtype=torch.bool),
    }
    for freeze in (True, False):
        torch.manual_seed(0)
        model = create_classifier("cyborg_local_tiny")
        config = TrainConfig(guidance="swap", freeze_bn=freeze)
        set_train_mode(model, config)
        norm = model.backbone.features[0][1]
        before = (norm.running_mean.clone(), norm.weight.detach().clone())
        get_method("swap")(model, batch, config).loss.backward()
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        assert model.training and norm.training is not freeze
        assert torch.equal(norm.running_mean, before[0]) is freeze
        assert not torch.equal(norm.weight, before[1])  # the affine part learns either way


def test_guidance_options_are_validated_and_reach_the_config(tmp_path):
    from core.errors import UserError
    from training.commands.train import add_arguments, build_config

    with pytest.raises(UserError, match="--mask-edge"):
        TrainConfig(mask_edge="fuzzy").validate()
    parser = __import__("argparse").ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["data", "--arch", "resnet18", "--out", str(tmp_path), "--freeze-bn", "--mask-edge", "hard"])
    config = build_config(args)
    assert config.freeze_bn is True and config.mask_edge == "hard"
    assert build_config(parser.parse_args(["data", "--arch", "resnet18", "--out", str(tmp_path)])).freeze_bn is False


def test_bench_method_specs_carry_their_own_settings():
    from benchmarks.commands.bench_guidance import parse_method, parse_settings
    from core.errors import UserError

    assert parse_method("swap_hard:freeze_bn=true:lr=0.001") == ("swap_hard", {"guidance": "swap", "mask_edge": "hard", "freeze_bn": True, "lr": 0.001})
    assert parse_settings(["mask_edge=hard"], "--set") == {"mask_edge": "hard"}
    with pytest.raises(UserError, match="unknown nope"):
        parse_method("nope")
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_method("swap:frozen=true")


def test_blur_keeps_salient_pixels_and_blurs_the_rest():
    from training.guidance_methods import gaussian_blur

    flat = torch.full((1, 3, 16, 16), 80.0)
    assert torch.allclose(gaussian_blur(flat, 2.0), flat)  # a constant image is its own blur
    edge = torch.zeros(1, 1, 16, 16)
    edge[..., 8:] = 255.0
    blurred = gaussian_blur(edge, 2.0)
    assert 0 < blurred[0, 0, 0, 7] < 255 and blurred[0, 0, 0, 0] == pytest.approx(0.0, abs=1e-3)
    model = PixelModel(torch.zeros(1, 3, 4, 4))
    cells = torch.zeros(2, 2, 2)
    cells[:, 0, 0] = 1.0
    batch = pixel_batch(cells)
    get_method("blur")(model, batch, TrainConfig(guidance="blur", mask_edge="hard"))
    images = batch["image"].float()
    assert torch.equal(model.seen[:, :, :2, :2], images[:, :, :2, :2])
    assert torch.allclose(model.seen[:, :, 2:, 2:], gaussian_blur(images, 4 / 32)[:, :, 2:, 2:])
