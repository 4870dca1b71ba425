"""The annotation store and `cyborg saliency merge` (training/annotations.py): seeded queues, resume,
validation, concurrent annotators, merged maps that training reads as human, the report."""

from __future__ import annotations

import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

from core.errors import UserError
from cyborg.cli import main
from tests.datasets import make_plain_dataset
from training.annotations import (
    AlreadyAnswered,
    AnnotationError,
    Session,
    check_annotator,
    read_mask_upload,
)

SIZE = 32


def mask_png(box=None, size=(SIZE, SIZE), mode="L") -> bytes:
    """A PNG mask with the box (x0, y0, x1, y1) marked."""
    array = np.zeros((size[1], size[0]), np.uint8)
    if box:
        x0, y0, x1, y1 = box
        array[y0:y1, x0:x1] = 255
    image = Image.fromarray(array, mode="L")
    if mode == "RGBA":
        image = Image.merge("RGBA", (image, image, image, image))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def data(tmp_path):
    return make_plain_dataset(tmp_path, n_real=3, n_fake=3, size=SIZE, maps=False)


@pytest.fixture
def session(tmp_path, data):
    return Session.create_or_open(tmp_path / "session", data, seed=3, repeats=1)


def answer_all(session, name, box=(4, 4, 12, 12), decide=lambda item: item.label):
    log = session.log(name)
    while True:
        pending, _, _ = log.progress()
        if pending is None:
            return
        log.record(pending.position, pending.item.id, decide(pending.item), 1500, mask_png(box))


def test_queue_is_seeded_per_annotator_and_covers_every_image_each_repeat(tmp_path, data):
    session = Session.create_or_open(tmp_path / "s", data, seed=1, repeats=2)
    queue = session.queue("alice")
    assert len(queue) == 12 and [a.position for a in queue] == list(range(12))
    for repeat in (0, 1):
        assert sorted(a.item.id for a in queue if a.repeat == repeat) == sorted(i.id for i in session.items)
    assert [a.item.id for a in queue] == [a.item.id for a in Session.open(tmp_path / "s").queue("alice")]
    assert [a.item.id for a in queue] != [a.item.id for a in session.queue("bob")]
    other_seed = Session.create_or_open(tmp_path / "t", data, seed=2, repeats=2)
    assert [a.item.id for a in queue] != [a.item.id for a in other_seed.queue("alice")]


def test_session_keeps_its_options(tmp_path, data, session):
    assert Session.create_or_open(tmp_path / "session", data, seed=3).items == session.items
    with pytest.raises(UserError, match="other options: seed"):
        Session.create_or_open(tmp_path / "session", data, seed=4)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        Session.create_or_open(tmp_path / "full", data)


def test_answers_resume_and_torn_lines_are_ignored(session):
    log = session.log("alice")
    first, done, total = log.progress()
    assert (done, total) == (0, 6)
    answer = log.record(first.position, first.item.id, "fake", 2000, mask_png((0, 0, 8, 8)))
    assert answer["correct"] == (first.item.label == "fake") and answer["marked_fraction"] == pytest.approx(64 / 1024)
    with open(log.path, "a") as file:
        file.write('{"position": 1, "torn')  # a crash mid-line
    reopened = Session.open(session.root).log("alice")
    second, done, _ = reopened.progress()
    assert done == 1 and second.position == 1
    reopened.record(second.position, second.item.id, "real", 100, mask_png())
    assert [a["position"] for a in reopened.answers()] == [0, 1]
    stored = np.asarray(Image.open(session.root / answer["mask"]))
    assert stored.shape == (SIZE, SIZE) and stored[:8, :8].min() == 255 and stored[8:, :].max() == 0


def test_an_answered_position_is_not_overwritten(session):
    log = session.log("alice")
    pending, _, _ = log.progress()
    log.record(pending.position, pending.item.id, "real", 10, mask_png((0, 0, 4, 4)))
    with pytest.raises(AlreadyAnswered):
        log.record(pending.position, pending.item.id, "fake", 10, mask_png((0, 0, 30, 30)))
    assert len(log.answers()) == 1


@pytest.mark.parametrize(
    "change, message",
    [
        ({"decision": "maybe"}, "decision"),
        ({"image": "0" * 16}, "image"),
        ({"position": 99}, "position"),
        ({"time_ms": -5}, "time_ms"),
        ({"mask": b"GIF89a"}, "not a PNG"),
        ({"mask": mask_png(size=(SIZE + 1, SIZE))}, "33x32, the image is 32x32"),
        ({"mask": b"\x89PNG\r\n\x1a\n" + b"junk"}, "unreadable"),
    ],
)
def test_bad_answers_are_refused(session, change, message):
    log = session.log("alice")
    pending, _, _ = log.progress()
    fields = {"position": pending.position, "image": pending.item.id, "decision": "real", "time_ms": 10, "mask": mask_png()}
    fields.update(change)
    with pytest.raises(AnnotationError, match=message):
        log.record(fields["position"], fields["image"], fields["decision"], fields["time_ms"], fields["mask"])
    assert log.answers() == []


def test_mask_is_gray_over_black_and_names_are_checked():
    transparent = read_mask_upload(mask_png((0, 0, 2, 2), mode="RGBA"), (SIZE, SIZE))
    assert transparent[:2, :2].min() == 255 and transparent[2:].max() == 0
    opaque = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 255))
    opaque.paste((255, 255, 255, 255), (0, 0, 3, 3))
    buffer = io.BytesIO()
    opaque.save(buffer, format="PNG")
    marked = read_mask_upload(buffer.getvalue(), (SIZE, SIZE))
    assert marked[:3, :3].min() == 255 and marked.sum() == 9 * 255
    for bad in ("", "../x", "a/b", ".hidden", "x" * 41, "a b"):
        with pytest.raises(AnnotationError):
            check_annotator(bad)
    assert check_annotator("anna.k-2") == "anna.k-2"


def test_concurrent_annotators_never_overwrite_each_other(session):
    names = ["ann", "ben", "cat"]
    threads = [threading.Thread(target=answer_all, args=(session, name)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert session.annotators() == names
    for name in names:
        assert sorted(a["position"] for a in session.log(name).answers()) == list(range(6))


def test_merge_writes_human_maps_training_reads(tmp_path, data, session):
    from training.data import discover, saliency_provenance
    from training.saliency import prepare_map, read_provenance

    answer_all(session, "ann", box=(0, 0, 16, 16))
    answer_all(session, "ben", box=(8, 8, 24, 24), decide=lambda item: "fake")
    maps = tmp_path / "maps"
    assert main(["saliency", "merge", str(session.root), "--out", str(maps)]) == 0
    provenance = read_provenance(maps)
    assert provenance["source"] == "human" and provenance["annotators"] == ["ann", "ben"]
    assert provenance["annotators_per_image"] == {"min": 2, "max": 2, "mean": 2.0} and provenance["count"] == 6
    samples = discover(data, heatmaps=maps)
    assert all(s.map_path is not None for s in samples) and saliency_provenance(samples) == "human"
    merged = np.asarray(Image.open(samples[0].map_path))
    assert merged[4, 4] == 128 and merged[12, 12] == 255 and merged[20, 20] == 128 and merged[30, 30] == 0
    assert prepare_map(samples[0].map_path, (2, 2)).max() == 1.0
    report = json.loads((maps / "report.json").read_text())
    assert report["images_done"] == 6 and report["answers"] == 12
    assert report["accuracy_per_class"]["real"] == {"answers": 6, "correct": 3, "accuracy": 0.5}
    assert report["accuracy_per_class"]["fake"]["accuracy"] == 1.0
    assert report["agreement"]["mean_iou"] == pytest.approx(64 / (256 * 2 - 64), abs=1e-4)
    assert report["agreement"]["same_decision"] == 0.5
    assert report["seconds_per_image"]["median"] == 1.5


def test_merge_refuses_foreign_maps_and_remerges_its_own(tmp_path, session, capsys):
    answer_all(session, "ann")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.png").write_bytes(mask_png())
    assert main(["saliency", "merge", str(session.root), "--out", str(foreign)]) == 2
    assert "not written by `cyborg saliency merge`" in capsys.readouterr().err
    maps = tmp_path / "maps"
    assert main(["saliency", "merge", str(session.root), "--out", str(maps)]) == 0
    assert "maps: 6 written" in capsys.readouterr().out
    assert main(["saliency", "merge", str(session.root), "--out", str(maps), "--min-annotators", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["maps"]["written"] == 0
    assert sorted(p.name for p in maps.iterdir()) == ["PROVENANCE.json", "report.json"]  # stale maps removed


def test_merge_of_nothing_is_a_clear_error(tmp_path):
    assert main(["saliency", "merge", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
