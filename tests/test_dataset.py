import pytest
from PIL import Image

from core.errors import UserError
from core.paths import safe_name
from trainers.dataset import (BatchPlan, DataPosition, DatasetConfig, ImageFolderDataset, bucket_size, import_files,
                              step_arithmetic)
from training_data import draw_dataset


def test_bad_files_are_reported_by_name_and_skipped(tmp_path):
    folder = draw_dataset(tmp_path / "d", n=3)
    (folder / "empty.png").write_bytes(b"")
    (folder / "fake.jpg").write_text("not an image")
    (folder / "notes.pdf").write_bytes(b"%PDF")
    Image.new("RGB", (5000, 5000)).save(folder / "huge.png")
    ds = ImageFolderDataset(DatasetConfig(str(folder), resolution=32, max_pixels=4000 * 4000))
    skipped = dict(ds.report.skipped)
    assert len(ds.samples) == 3
    assert "0 bytes" in skipped["empty.png"] and "unreadable" in skipped["fake.jpg"]
    assert "too large" in skipped["huge.png"] and "not an image" in skipped["notes.pdf"]


def test_captions_trigger_and_caption_for_all(tmp_path):
    folder = draw_dataset(tmp_path / "d", n=2, caption="a red circle")
    Image.new("RGB", (32, 32)).save(folder / "nocap.png")
    ds = ImageFolderDataset(DatasetConfig(str(folder), trigger="sks"))
    caps = {s.path.name: s.caption for s in ds.samples}
    assert caps["img00.png"] == "sks a red circle" and caps["nocap.png"] == "sks"
    assert any("nocap.png" in n for n in ds.report.notes)
    ds = ImageFolderDataset(DatasetConfig(str(folder), caption="one for all"))
    assert {s.caption for s in ds.samples} == {"one for all"}


def test_crop_and_buckets(tmp_path):
    folder = draw_dataset(tmp_path / "d", n=2, size=(64, 32))
    x, _ = ImageFolderDataset(DatasetConfig(str(folder), resolution=32)).load(0)
    assert tuple(x.shape) == (3, 32, 32) and -1.0 <= x.min() and x.max() <= 1.0
    x, _ = ImageFolderDataset(DatasetConfig(str(folder), resolution=32, buckets=True)).load(0)
    assert x.shape[2] > x.shape[1]  # wide images stay wide
    assert bucket_size(1000, 1000, 512, 64) == (512, 512)
    w, h = bucket_size(1600, 900, 512, 64)
    assert w > h and w % 64 == 0 and h % 64 == 0


def test_batches_are_deterministic_full_and_resumable(tmp_path):
    ds = ImageFolderDataset(DatasetConfig(str(draw_dataset(tmp_path / "d", n=5)), repeats=2))
    plan = BatchPlan(ds, batch_size=4, seed=7)
    assert plan.steps_per_epoch == 3  # ceil(10 / 4)
    pos, seen = DataPosition(), []
    for _ in range(7):
        batch, pos = plan.next(pos)
        assert len(batch) == 4
        seen.append(batch)
    # resuming from a saved position gives the same continuation
    pos2 = DataPosition()
    for _ in range(4):
        _, pos2 = plan.next(pos2)
    again = BatchPlan(ds, batch_size=4, seed=7)
    cont = []
    for _ in range(3):
        b, pos2 = again.next(pos2)
        cont.append(b)
    assert cont == seen[4:]
    assert BatchPlan(ds, 4, seed=8).epoch_batches(0) != plan.epoch_batches(0)


def test_arithmetic_sentence():
    assert step_arithmetic(20, 5, 4, 1, 100) == "20 images × 5 repeats ÷ batch 4 = 25 steps per epoch; 4.00 epochs = 100 steps"


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ImageFolderDataset(DatasetConfig(str(tmp_path / "missing")))
    (tmp_path / "e").mkdir()
    with pytest.raises(UserError, match="no usable images"):
        ImageFolderDataset(DatasetConfig(str(tmp_path / "e")))


def test_upload_names_are_sanitised(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (16, 16)).save(src / "a.png")
    assert safe_name("../../x.png") == "x.png" and safe_name("..") == "file" and safe_name("été.png") == "été.png"
    names = import_files([str(src / "a.png")], tmp_path / "dest")
    assert names == ["a.png"] and (tmp_path / "dest" / "a.png").is_file()


def test_an_upload_never_changes_a_dataset_saved_before(tmp_path):
    from trainers.dataset import upload_dataset

    first, second = tmp_path / "first", tmp_path / "second"
    for folder, colour in ((first, "red"), (second, "blue")):
        folder.mkdir()
        Image.new("RGB", (16, 16), colour).save(folder / "a.png")
        (folder / "a.txt").write_text(f"a {colour} square")
    datasets = tmp_path / "datasets"
    kept = upload_dataset([str(first / "a.png"), str(first / "a.txt")], datasets, "mine")
    assert kept == datasets / "mine"
    before = {p.name: p.read_bytes() for p in kept.iterdir()}
    # the same upload again (the Train tab re-reads it on every preview): the same folder
    assert upload_dataset([str(first / "a.png"), str(first / "a.txt")], datasets, "mine") == kept
    # other pictures under the same name: a folder of their own, the first one untouched
    other = upload_dataset([str(second / "a.png"), str(second / "a.txt")], datasets, "mine")
    assert other == datasets / "mine-2" and (other / "a.txt").read_text() == "a blue square"
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == before
