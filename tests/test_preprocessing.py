"""The recorded scale: crops instead of resizes, one preprocessing in training and serving; several
data folders in one run with per-source validation."""

from __future__ import annotations

import dataclasses
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from core.contract import ModelContract
from core.errors import ContractError, ImageError, UserError
from core.images import prepare, scale_to, scaled_size, to_model_input
from tests.datasets import make_plain_dataset
from training.data import EpochSampler, FaceDataset, discover, split_samples


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def contract(scale: int, size: int = 24) -> ModelContract:
    return ModelContract(name="m", version=1, architecture="tiny", input_height=size, input_width=size, cam_height=3,
                         cam_width=3, mean=(0.5,) * 3, std=(0.5,) * 3, threshold=0.5, scale=scale)  # fmt: skip


def test_an_image_at_the_models_scale_is_cropped_not_resampled():
    image = noise(32, 32)
    array = to_model_input(image, 24, 24, scale=32)
    assert np.array_equal(array.transpose(1, 2, 0), np.asarray(image)[4:28, 4:28])


def test_non_square_images_keep_their_aspect_ratio():
    assert scaled_size((300, 200), 100) == (150, 100)
    assert scaled_size((200, 300), 100) == (100, 150)
    image = Image.new("RGB", (90, 30), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 30, 30))  # a white square on the left third
    assert scale_to(image, 30) is image
    centre = to_model_input(image, 24, 24, scale=30)
    squashed = to_model_input(image, 24, 24)  # legacy: straight resize, the square becomes a stripe
    assert centre.max() == 0  # the centre crop holds none of the left third
    assert squashed[:, :, :6].min() > 200


def test_prepare_follows_the_contracts_scale_and_legacy_contracts_resize():
    image = noise(40, 32, seed=1)
    assert np.array_equal(prepare(image, contract(scale=32)), to_model_input(image, 24, 24, 32))
    legacy = ModelContract.from_dict({k: v for k, v in contract(0).to_dict().items() if k != "scale"})
    assert legacy.scale == 0
    assert np.array_equal(prepare(image, legacy), np.asarray(image.resize((24, 24), Image.Resampling.BILINEAR)).transpose(2, 0, 1))


def test_a_scale_smaller_than_the_input_is_refused():
    with pytest.raises(ContractError, match="scale 20"):
        ModelContract.from_dict(contract(scale=20).to_dict())
    with pytest.raises(ImageError, match="smaller than"):
        from core.images import crop_box

        crop_box((20, 30), 24, 24)


def test_several_folders_name_their_sources_and_validation_holds_every_source(tmp_path):
    faces = make_plain_dataset(tmp_path / "a", n_real=10, n_fake=10, maps=False)
    other = make_plain_dataset(tmp_path / "b", n_real=0, n_fake=10, maps=False, seed=1)
    shutil.move(faces, tmp_path / "faces")
    shutil.move(other, tmp_path / "diffusion")
    samples = discover([tmp_path / "faces", tmp_path / "diffusion"])
    assert Counter(s.source for s in samples) == {"faces/real": 10, "faces/fake": 10, "diffusion/fake": 10}
    splits = split_samples(samples, 0.2, seed=0)
    assert Counter(s.source for s in splits["val"]) == {"faces/real": 2, "faces/fake": 2, "diffusion/fake": 2}
    with pytest.raises(UserError, match="different names"):
        discover([tmp_path / "faces", tmp_path / "faces"])


def test_training_on_one_class_names_the_missing_class(tmp_path):
    from training.config import TrainConfig
    from training.trainer import load_data

    data = make_plain_dataset(tmp_path, n_real=0, n_fake=6, maps=False)
    config = TrainConfig(data=str(data), arch="cyborg_local_tiny", out=str(tmp_path / "run"), workers=0)
    with pytest.raises(UserError, match="no real images"):
        load_data(config, 32, (4, 4))


def test_training_crops_are_random_per_epoch_reproducible_and_carry_the_map(tmp_path):
    data = make_plain_dataset(tmp_path, n_real=2, n_fake=2, size=40)
    samples = discover(data)
    train = FaceDataset(samples, 32, (4, 4), scale=40, train=True, seed=3)
    again = FaceDataset(samples, 32, (4, 4), scale=40, train=True, seed=3)
    n = len(samples)
    first, second = train[0], train[n]  # item 0 in epoch 0 and in epoch 1
    assert not torch.equal(first["image"], second["image"]) or not torch.equal(train[1]["image"], train[n + 1]["image"])
    assert torch.equal(first["image"], again[0]["image"]) and torch.equal(first["saliency"], again[0]["saliency"])
    # the crop is a window of the untouched 40-px image, and the map is the same window of the map
    full = np.asarray(Image.open(samples[0].path).convert("RGB")).transpose(2, 0, 1)
    crop = first["image"].numpy()
    windows = [(y, x) for y in range(9) for x in range(9) if np.array_equal(full[:, y:y + 32, x:x + 32], crop)]
    assert len(windows) == 1
    (y, x), saliency_map = windows[0], np.asarray(Image.open(samples[0].map_path).convert("L"), dtype=np.float32) / 255
    from training.saliency import prepare_map

    assert torch.allclose(first["saliency"], torch.from_numpy(prepare_map(saliency_map[y:y + 32, x:x + 32], (4, 4))), atol=1e-5)
    # evaluation: the centre crop every time, exactly what serving does
    val = FaceDataset(samples, 32, (4, 4), scale=40)
    assert np.array_equal(val[0]["image"].numpy(), full[:, 4:36, 4:36])


def test_epoch_sampler_offsets_indices_by_the_epoch():
    sampler = EpochSampler(range(3), 3)
    sampler.set_epoch(2)
    assert list(sampler) == [6, 7, 8] and len(sampler) == 3


def test_checkpoint_and_contract_record_the_scale(tmp_path):
    from training.checkpoint import Checkpoint

    state = Checkpoint(image_size=24)
    assert state.input_scale == 24
    assert dataclasses.replace(state, scale=32).input_scale == 32


def test_the_cam_is_placed_where_the_model_looked():
    import io

    from core import heatmaps
    from core.images import input_region

    assert input_region((32, 32), contract(scale=0)) == (0, 0, 32, 32)
    assert input_region((32, 32), contract(scale=32)) == (4, 4, 28, 28)
    assert input_region((64, 128), contract(scale=32)) == (8, 40, 56, 88)  # scaled 32x64, crop at (4, 20)
    picture = np.full((128, 64, 3), 100, dtype=np.uint8)
    region = input_region((64, 128), contract(scale=32))
    png = np.asarray(Image.open(io.BytesIO(heatmaps.render("png", np.ones((3, 3), np.float32), picture, region))))
    assert png.shape == (128, 64) and png[40:88, 8:56].min() == 255
    assert png[:40].max() == 0 and png[88:].max() == 0 and png[:, :8].max() == 0
    overlay = np.asarray(Image.open(io.BytesIO(heatmaps.render("overlay", np.ones((3, 3), np.float32), picture, region))))
    assert np.array_equal(overlay[:40], picture[:40]) and not np.array_equal(overlay[40:88, 8:56], picture[40:88, 8:56])


def test_adamw_and_cosine_schedule_are_built_from_the_config():
    from training.config import TrainConfig
    from training.trainer import build_optimizer, build_scheduler

    model = torch.nn.Linear(2, 2)
    config = TrainConfig(optimizer="adamw", schedule="cosine", lr=1e-3, epochs=4, weight_decay=0.05)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["weight_decay"] == 0.05
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(1e-3) and rates == sorted(rates, reverse=True) and optimizer.param_groups[0]["lr"] == pytest.approx(0, abs=1e-12)
    with pytest.raises(UserError, match="--optimizer"):
        TrainConfig(optimizer="lbfgs").validate()
