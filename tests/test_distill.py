"""Distillation: the teacher term's value and gradient, a frozen teacher, a student run (and its model.json), bad teachers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.contract import FAKE_INDEX, sha256_file
from core.errors import UserError
from cyborg.cli import main
from tests.test_trainer import tiny_config
from training.checkpoint import model_from_checkpoint, read_checkpoint, save_checkpoint
from training.config import TrainConfig
from training.distill import distillation_loss, load_teacher, with_teacher
from training.export import ExportRequest, export_checkpoint
from training.guidance import get_method
from training.model import create_classifier, fake_probability
from training.trainer import fit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def teacher_run(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "teacher"
    fit(tiny_config(tiny_data, out, seed=3), progress=False)
    return out


def test_the_term_is_zero_for_equal_logits_and_pulls_the_student_toward_the_teacher():
    teacher = torch.tensor([[2.0, -1.0], [-0.5, 1.5]])
    assert distillation_loss(teacher.clone(), teacher, 2.0).item() == pytest.approx(0.0, abs=1e-7)
    student = torch.zeros(2, 2, requires_grad=True)
    loss = distillation_loss(student, teacher, 2.0)
    assert loss.item() > 0
    loss.backward()
    # gradient descent moves each logit toward the teacher's preferred class
    assert (-student.grad * (teacher.softmax(1) - 0.5)).sum() > 0
    # T^2 scaling: at a high temperature the term stays on the cross-entropy's scale, about (dz)^2 / 4 per pair
    high = distillation_loss(torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), 50.0).item()
    assert high == pytest.approx((2.0**2) / 8, rel=0.05)


def test_a_step_with_a_teacher_adds_the_weighted_term_and_never_changes_the_teacher():
    torch.manual_seed(0)
    student, teacher = create_classifier("cyborg_local_tiny"), create_classifier("cyborg_local_tiny").eval()
    teacher.requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    batch = {"image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), "label": torch.tensor([0, 1, 0, 1])}
    config = TrainConfig(guidance="ce")
    plain = get_method("ce")(student, batch, config)
    taught = with_teacher(get_method("ce"), teacher, weight=0.7, temperature=3.0)(student, batch, config)
    expected = distillation_loss(taught.logits, teacher(batch["image"]).logits, 3.0)
    torch.testing.assert_close(taught.distillation, expected)
    torch.testing.assert_close(taught.loss, plain.loss + 0.7 * expected)
    taught.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_a_clean_view_shows_the_teacher_the_framed_face_before_the_everyday_changes(tiny_data):
    """With --distill-view clean the training items carry the same face, flipped and cropped alike, but
    not blurred; the taught step hands that view to the teacher and the changed one to the student."""
    from PIL import Image

    from core.images import read_image, scale_to, to_chw
    from training.augment import Augmenter, AugmentSettings
    from training.data import FaceDataset, discover

    samples = discover(str(tiny_data))[:4]
    augmenter = Augmenter(AugmentSettings(names=("flip", "blur"), p=1.0, flip_p=1.0, blur_sigma=(2.0, 2.0)))
    dataset = FaceDataset(samples, 24, (3, 3), scale=24, train=True, augmenter=augmenter, seed=5, teacher_view=True)
    plain = FaceDataset(samples, 24, (3, 3), scale=24, train=True, augmenter=augmenter, seed=5)
    item, same = dataset[1], plain[1]
    assert "teacher_image" not in same and torch.equal(item["image"], same["image"])  # the student's view is unchanged
    flipped = scale_to(read_image(samples[1].path), 24).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert torch.equal(item["teacher_image"], torch.from_numpy(to_chw(flipped)))  # flipped, not blurred
    assert item["image"].float().std() < item["teacher_image"].float().std()  # the student's copy is the blurred one

    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, images):
            seen.append(images)
            return student(images)

    student = create_classifier("cyborg_local_tiny")
    batch = {"image": item["image"][None].float(), "teacher_image": item["teacher_image"][None].float(), "label": item["label"][None]}
    with_teacher(get_method("ce"), Recorder(), weight=1.0, temperature=2.0)(student, batch, TrainConfig(guidance="ce"))
    assert len(seen) == 1 and torch.equal(seen[0], batch["teacher_image"])


def test_a_clean_view_run_trains_and_is_recorded(tiny_data, teacher_run, tmp_path):
    config = tiny_config(tiny_data, tmp_path / "clean", guidance="ce", alpha=1.0, epochs=1, augment="flip,blur,jpeg",
                         augment_p=0.5, teacher=str(teacher_run / "best.pt"), distill_view="clean")  # fmt: skip
    fit(config, progress=False)
    row = json.loads((tmp_path / "clean" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["train_distill"] > 0 and read_checkpoint(tmp_path / "clean" / "last.pt").config.distill_view == "clean"


def biased_teacher(run: Path, out: Path) -> Path:
    """The run's network with its head's bias set so it calls nearly everything fake: a teacher unlike the labels."""
    checkpoint = read_checkpoint(run / "best.pt")
    model, _ = model_from_checkpoint(checkpoint)
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([-4.0, 4.0]) if FAKE_INDEX == 1 else torch.tensor([4.0, -4.0]))
    checkpoint.model = model.state_dict()
    save_checkpoint(checkpoint, out)
    return out


def test_a_student_run_logs_the_teacher_term_and_follows_the_teacher(tiny_data, teacher_run, tmp_path):
    """Same data, seed and steps; only the teacher differs: the taught student leans the teacher's way."""
    teacher_path = biased_teacher(teacher_run, tmp_path / "teacher.pt")
    images = torch.randint(0, 256, (16, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)

    def mean_fake_probability(run: Path) -> float:
        student, _ = model_from_checkpoint(read_checkpoint(run / "last.pt"))
        with torch.no_grad():
            return fake_probability(student(images).logits).mean().item()

    settings = dict(guidance="ce", alpha=1.0, epochs=2)
    fit(tiny_config(tiny_data, tmp_path / "alone", **settings), progress=False)
    fit(tiny_config(tiny_data, tmp_path / "taught", teacher=str(teacher_path), distill_weight=5.0, **settings), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "taught" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["train_distill"] > 0 for row in rows)
    assert "train_distill" not in json.loads((tmp_path / "alone" / "metrics.jsonl").read_text().splitlines()[0])
    assert read_checkpoint(tmp_path / "taught" / "last.pt").config.teacher == str(teacher_path)
    assert mean_fake_probability(tmp_path / "taught") > mean_fake_probability(tmp_path / "alone") + 0.2
    folder = export_checkpoint(ExportRequest(tmp_path / "taught" / "best.pt", tmp_path / "repo", "student", 1, calibrate="none"))
    record = json.loads((folder / "model.json").read_text())["training"]["teacher"]
    assert record["checkpoint"] == str(teacher_path) and record["distill_weight"] == 5.0 and record["distill_temperature"] == 2.0
    assert record["distill_view"] == "augmented"
    assert record["checkpoint_sha256"] == sha256_file(teacher_path)


def test_a_teacher_at_another_input_size_or_a_missing_one_is_refused(teacher_run, tmp_path):
    with pytest.raises(UserError, match=r"--teacher .*input size 32 px, but the student is trained at 64"):
        load_teacher(teacher_run / "best.pt", 64, 64, torch.device("cpu"))
    with pytest.raises(UserError, match=r"scale 32 px, but the student is trained at 40"):
        load_teacher(teacher_run / "best.pt", 32, 40, torch.device("cpu"))
    with pytest.raises(UserError, match="no such checkpoint file"):
        load_teacher(tmp_path / "absent.pt", 32, 32, torch.device("cpu"))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--distill-weight", "-1"], r"--distill-weight -1.0: must be at least 0"),
        (["--distill-temperature", "0"], r"--distill-temperature 0.0: must be above 0"),
        (["--distill-view", "sharp"], r"--distill-view 'sharp': choose one of augmented, clean"),
        (["--distill-view", "clean", "--augment", "everyday"], r"--distill-view clean shows the teacher the image before"),
    ],
)
def test_bad_distillation_settings_are_named(tiny_data, tmp_path, capsys, flags, message):
    code = main(["train", str(tiny_data), "--arch", "cyborg_local_tiny", "--weights", "none", "--image-size", "32",
                 "--device", "cpu", "--out", str(tmp_path / "run"), *flags])  # fmt: skip
    assert code != 0
    assert message in capsys.readouterr().err.replace("\\", "")


def test_a_taught_run_resumes_to_the_same_weights_and_refuses_another_teacher(tiny_data, teacher_run, tmp_path):
    teacher = str(teacher_run / "best.pt")
    settings = dict(guidance="ce", alpha=1.0, teacher=teacher, distill_weight=2.0)
    fit(tiny_config(tiny_data, tmp_path / "straight", epochs=2, **settings), progress=False)
    fit(tiny_config(tiny_data, tmp_path / "resumed", epochs=1, **settings), progress=False)
    with pytest.raises(UserError, match=r"teacher .* -> 'other.pt'"):
        fit(tiny_config(tiny_data, tmp_path / "resumed", epochs=2, **{**settings, "teacher": "other.pt"}), resume=True, progress=False)
    fit(tiny_config(tiny_data, tmp_path / "resumed", epochs=2, **settings), resume=True, progress=False)
    straight, resumed = read_checkpoint(tmp_path / "straight" / "last.pt"), read_checkpoint(tmp_path / "resumed" / "last.pt")
    for name, tensor in straight.model.items():
        torch.testing.assert_close(resumed.model[name], tensor, rtol=0, atol=1e-6, msg=name)
