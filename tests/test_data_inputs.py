"""Real-world inputs of the data layer (issue 17): truncated images, file names that are not valid
UTF-8, symbolic links that point nowhere or loop, and a damaged built-in set.

Each kind is tested on every path that meets it: indexing (:func:`energylab.data.index_folder`,
and the JSON it keeps), the training stream (files that break after indexing, with ``workers`` 0
and 2 and ``cache``), loading into memory (:func:`energylab.data.load_dataset`),
:func:`energylab.data.load_image` and the test images.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from energylab import data as D

# ---------------------------------------------------------------------------------------------
# helpers


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _write(folder: Path | bytes, name: str | bytes, content: bytes) -> bytes:
    """Write ``content`` to ``folder/name`` through byte paths (names need not be UTF-8)."""
    path = os.path.join(os.fsencode(folder), os.fsencode(name))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)
    return path


def _truncate(path: Path | bytes, keep: float = 0.6) -> None:
    """Cut a file to ``keep`` of its bytes: its header still opens, ``load()`` fails."""
    with open(path, "rb") as f:
        content = f.read()
    with open(path, "wb") as f:
        f.write(content[: int(len(content) * keep)])


def _six_jpegs(root: Path, cut: int | None = 3) -> Path:
    """The issue's folder: six 128x128 JPEGs in ``train/`` (``img{cut}.jpg`` cut to 60 %), one in
    ``test/``."""
    for i in range(6):
        _write(root / "train", f"img{i}.jpg", _jpeg(_rgb(128, 128, seed=i)))
    _write(root / "test", "t0.jpg", _jpeg(_rgb(128, 128, seed=10)))
    if cut is not None:
        _truncate(root / "train" / f"img{cut}.jpg")
    return root


def _data_warnings(fn: Callable[[], Any]) -> tuple[Any, list[str]]:
    """``(fn(), messages of the DataWarnings it gave)``, every warning recorded."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in record if issubclass(w.category, D.DataWarning)]


def _assert_one_line(err: pytest.ExceptionInfo[D.DataError], *needles: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg and "\r" not in msg
    msg.encode("utf-8")  # printable on a UTF-8 console: no lone surrogate
    for needle in needles:
        assert needle in msg, (needle, msg)


def _strings(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in _strings(k) + _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def _strict_json(path: Path) -> Any:
    """The JSON at ``path``, as a strict parser reads it: UTF-8 text, no lone surrogates."""
    content = json.loads(path.read_bytes().decode("utf-8"))
    for s in _strings(content):
        s.encode("utf-8")  # UnicodeEncodeError on a lone surrogate (invalid in I-JSON / RFC 7493)
    return content


def _console(*texts: str) -> str:
    """Print ``texts`` to a strict UTF-8 console (``errors="strict"``, as a UTF-8 terminal)."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    for text in texts:
        print(text, file=out)
    out.flush()
    return out.buffer.getvalue().decode("utf-8")


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Count every pixel decoding Pillow does from now on (``ImageFile.load``)."""
    calls: list[str] = []
    real = ImageFile.ImageFile.load

    def load(self):
        calls.append(str(getattr(self, "filename", "")))
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return calls


# ---------------------------------------------------------------------------------------------
# 1. a truncated image in a training folder


def test_truncated_training_image_is_dropped_when_indexing(tmp_path: Path) -> None:
    root = _six_jpegs(tmp_path / "data")
    path = tmp_path / "run" / "data_index.json"
    index, messages = _data_warnings(lambda: D.index_folder(root, path))
    assert len(messages) == 1 and "img3.jpg" in messages[0] and "truncated" in messages[0]
    assert "\n" not in messages[0]
    assert [im.name for im in index.train] == ["img0.jpg", "img1.jpg", "img2.jpg", "img4.jpg", "img5.jpg"]
    assert [(d["file"], "truncated" in d["reason"]) for d in index.dropped] == [
        (str(root.resolve() / "train" / "img3.jpg"), True)
    ]
    assert _strict_json(path)["dropped"] == index.dropped  # the index records the drop
    # the run then never meets the file: a stream over many steps draws only good images
    stream, messages = _data_warnings(lambda: D.TrainStream(index, 64, 4, seed=0, workers=0))
    assert stream.dropped == index.dropped and messages == []
    _, messages = _data_warnings(lambda: [b for _, b in stream.batches(0, 30)])
    assert messages == []


def test_index_decodes_each_file_once_and_reuses_the_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _six_jpegs(tmp_path / "data")
    path = tmp_path / "data_index.json"
    decodes = _count_decodes(monkeypatch)
    first, messages = _data_warnings(lambda: D.index_folder(root, path))
    decoded = {Path(f).name for f in decodes}
    assert {f"img{i}.jpg" for i in range(6)} | {"t0.jpg"} <= decoded  # every file, pixels included
    decodes.clear()
    again, messages_again = _data_warnings(lambda: D.index_folder(root, path))
    assert decodes == [] and again == first  # unchanged folder: no decoding at all
    assert messages_again == messages and len(messages) == 1 and "img3.jpg" in messages[0]
    # the file is rewritten whole: its fingerprint changes, the index is rebuilt, and it is back
    _write(root / "train", "img3.jpg", _jpeg(_rgb(128, 128, seed=3)))
    os.utime(root / "train" / "img3.jpg", ns=(1, 1))
    rebuilt, messages = _data_warnings(lambda: D.index_folder(root, path))
    assert messages == [] and rebuilt.dropped == [] and len(rebuilt.train) == 6
    assert _strict_json(path)["dropped"] == []


def test_index_rebuilds_an_old_header_only_or_malformed_index(tmp_path: Path) -> None:
    """A stored index of version 1 (headers only: it listed the truncated file), or one whose
    content is malformed, is rebuilt, not trusted and not a traceback."""
    root = _six_jpegs(tmp_path / "data")
    path = tmp_path / "data_index.json"
    _data_warnings(lambda: D.index_folder(root, path))
    stored = json.loads(path.read_text())
    header_only = {**stored, "version": 1, "dropped": [],
                   "images": {"train": [[f"img{i}.jpg", 128, 128] for i in range(6)],
                              "test": [["t0.jpg", 128, 128]]}}
    malformed = [{**stored, "images": {"train": [["x.jpg", 1, 1]], "test": [["t0.jpg", 128, 128]]}},
                 {**stored, "images": {"train": [["img0.jpg", "128", 128]]}},
                 {**stored, "dropped": "img3.jpg"}, {**stored, "images": []}]
    for content in (header_only, *malformed):
        path.write_text(json.dumps(content))
        index, messages = _data_warnings(lambda: D.index_folder(root, path))
        assert [im.name for im in index.train] == ["img0.jpg", "img1.jpg", "img2.jpg", "img4.jpg", "img5.jpg"]
        assert len(messages) == 1 and "img3.jpg" in messages[0]
        assert json.loads(path.read_text()) == stored  # rewritten


def test_only_truncated_training_images_is_a_one_line_error(tmp_path: Path) -> None:
    root = _six_jpegs(tmp_path / "data", cut=None)
    for i in range(6):
        _truncate(root / "train" / f"img{i}.jpg")
    for load in (lambda: D.index_folder(root), lambda: D.load_dataset(str(root))):
        with pytest.raises(D.DataError) as err:
            load()
        _assert_one_line(err, str(root / "train"), "none of its 6 image files", "truncated")


def test_truncated_test_image_and_flat_split_agree_with_load_dataset(tmp_path: Path) -> None:
    root = _six_jpegs(tmp_path / "data", cut=None)
    _write(root / "test", "t1.jpg", _jpeg(_rgb(128, 128, seed=11)))
    _truncate(root / "test" / "t0.jpg")
    index, messages = _data_warnings(lambda: D.index_folder(root))
    assert len(messages) == 1 and "t0.jpg" in messages[0]
    assert [n for n, _ in index.load_test()] == ["t1.jpg"]  # no DataError before training
    flat = tmp_path / "flat"
    for i in range(7):
        _write(flat, f"f{i}.jpg", _jpeg(_rgb(96, 96, seed=i)))
    _truncate(flat / "f1.jpg")
    ds, ds_messages = _data_warnings(lambda: D.load_dataset(str(flat)))
    index, messages = _data_warnings(lambda: D.index_folder(flat))
    assert [im.name for im in index.test] == [n for n, _ in ds.test] == ["f0.jpg", "f6.jpg"]
    assert [im.name for im in index.train] == [n for n, _ in ds.train]
    assert len(messages) == len(ds_messages) == 1 and "f1.jpg" in messages[0] and "f1.jpg" in ds_messages[0]


def _crop_of(crop: torch.Tensor, images: list[torch.Tensor]) -> bool:
    """Whether ``crop`` (3, p, p) is a crop of one of ``images``, flipped or not."""
    p = crop.shape[-1]
    for img in images:
        for c in (crop, crop.flip(-1)):
            corner = (img[:, : img.shape[1] - p + 1, : img.shape[2] - p + 1] == c[:, :1, :1]).all(0)
            for top, left in corner.nonzero().tolist():
                if torch.equal(img[:, top : top + p, left : left + p], c):
                    return True
    return False


@pytest.mark.parametrize("change", ["truncated", "resized"])
def test_stream_replaces_crops_of_a_file_that_breaks_after_indexing(tmp_path: Path, change: str) -> None:
    root = _six_jpegs(tmp_path / "data", cut=None)
    index = D.index_folder(root)
    images = [D.load_image(im.path) for im in index.train]
    reference = D.TrainSampler(images, 32, 6, seed=4)
    bad = 2
    if change == "truncated":
        _truncate(root / "train" / "img2.jpg")
    else:
        _write(root / "train", "img2.jpg", _jpeg(_rgb(100, 140, seed=2)))
    good = [img for i, img in enumerate(images) if i != bad]
    sizes = [(im.height, im.width) for im in index.train]
    runs = []
    for workers, cache in ((0, False), (2, False), (0, True)):
        def stream_all(workers: int = workers, cache: bool = cache) -> tuple[D.TrainStream, list]:
            stream = D.TrainStream(index, 32, 6, seed=4, workers=workers, cache=cache)
            return stream, [b for _, b in stream.batches(0, 12)]

        (stream, batches), messages = _data_warnings(stream_all)
        assert len(messages) == 1 and "img2.jpg" in messages[0], messages  # once, naming it
        assert ("truncated" if change == "truncated" else "index again") in messages[0]
        assert [d["file"] for d in stream.dropped] == [index.train[bad].path]
        runs.append(batches)
    drawn = 0
    for step in range(12):
        plan = D._crop_plan(sizes, 32, 6, 4, step, 0)
        expected = reference.batch(step)
        for slot, (idx, *_) in enumerate(plan):
            got = runs[0][step][slot]
            if idx == bad:
                drawn += 1
                assert _crop_of(got, good)  # replaced by a real crop of another image
            else:
                assert torch.equal(got, expected[slot])  # the other crops are untouched
        assert all(torch.equal(run[step], runs[0][step]) for run in runs)  # workers, cache
    assert drawn > 0
    # resumed at step 7 (a fresh process): the same numbers
    resumed, _ = _data_warnings(lambda: [b for _, b in D.TrainStream(index, 32, 6, seed=4, workers=0)
                                         .batches(7, 12)])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][7:], resumed, strict=True))


def test_stream_with_no_decodable_image_left_is_a_one_line_error(tmp_path: Path) -> None:
    root = _six_jpegs(tmp_path / "data", cut=None)
    index = D.index_folder(root)
    for i in range(6):
        _truncate(root / "train" / f"img{i}.jpg")
    for workers in (0, 2):
        with pytest.raises(D.DataError) as err, warnings.catch_warnings():
            warnings.simplefilter("ignore", D.DataWarning)
            list(D.TrainStream(index, 32, 4, seed=0, workers=workers).batches(0, 3))
        _assert_one_line(err, "none of the 6 training images", "index again", "truncated")
    with pytest.raises(D.DataError) as err:
        D.TrainStream(index, 32, 4, seed=0, cache=True)
    _assert_one_line(err, "none of the 6 training images")


# ---------------------------------------------------------------------------------------------
# 2. file names that are not valid UTF-8


def test_non_utf8_names_are_read_and_shown_escaped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    arrays = {b"bad\xff.png": _rgb(96, 80, seed=1), b"caf\xe9.png": _rgb(90, 90, seed=2),
              b"good.png": _rgb(80, 100, seed=3)}
    for name, arr in arrays.items():
        _write(root / "train", name, _png(arr))
    _write(root / "test", b"t\xfe.png", _png(_rgb(70, 70, seed=4)))
    path = tmp_path / "run" / "data_index.json"
    index, messages = _data_warnings(lambda: D.index_folder(root, path))
    assert messages == []
    _console(index.source, *(im.name for im in index.train + index.test))  # no UnicodeEncodeError
    stored = _strict_json(path)  # written, and read back by a strict parser
    assert [im.name for im in index.train] == ["bad\\xff.png", "caf\\xe9.png", "good.png"]
    assert [im.name for im in index.test] == ["t\\xfe.png"]
    assert [entry[0] for entry in stored["images"]["train"]] == [im.name for im in index.train]
    # the files are still read, from their real paths
    for im in index.train:
        expected = arrays[os.fsencode(Path(im.path).name)]
        assert torch.equal(D.load_image(im.path), torch.from_numpy(expected).permute(2, 0, 1) / 255.0)
    assert [n for n, _ in index.load_test()] == ["t\\xfe.png"]
    batch = D.TrainStream(index, 64, 4, seed=0, workers=0).batch(0)
    assert batch.shape == (4, 3, 64, 64)
    # reused from the JSON without decoding: the escaped names map back to the files
    decodes = _count_decodes(monkeypatch)
    assert D.index_folder(root, path) == index and decodes == []
    ds = D.load_dataset(str(root))
    assert [n for n, _ in ds.train] == [im.name for im in index.train]
    assert D.shown_name(os.path.join(os.fsencode(root), b"train", b"bad\xff.png")) == "bad\\xff.png"


def test_non_utf8_folder_and_bad_file_names_in_messages(tmp_path: Path) -> None:
    raw = os.path.join(os.fsencode(tmp_path), b"d\xe9ta")
    root = os.fsdecode(raw)  # the str Python gives for it (os.listdir, argv): lone surrogates
    for i in range(3):
        _write(raw, f"img{i}.png", _png(_rgb(80, 80, seed=i)))
    cut = _write(raw, b"cut\xff.jpg", _jpeg(_rgb(80, 80)))
    _truncate(cut)
    path = tmp_path / "data_index.json"
    for load in (lambda: D.index_folder(root, path), lambda: D.load_dataset(root),
                 lambda: D.index_folder(raw, path)):
        loaded, messages = _data_warnings(load)
        _console(loaded.source, *messages)  # no UnicodeEncodeError
        assert len(messages) == 1 and "cut\\xff.jpg" in messages[0] and "d\\xe9ta" in messages[0]
        assert loaded.source.endswith("d\\xe9ta")
    index, _ = _data_warnings(lambda: D.index_folder(root, path))
    assert index.dropped[0]["file"].endswith("d\\xe9ta/cut\\xff.jpg")
    stored = _strict_json(path)
    assert stored["source"] == index.source and stored["dropped"] == index.dropped
    for bad_path in (os.fsdecode(cut), cut):  # load_image: surrogate-escaped str or bytes
        with pytest.raises(D.DataError) as err:
            D.load_image(bad_path)
        _assert_one_line(err, "cut\\xff.jpg", "truncated")
    with pytest.raises(D.DataError) as err:  # a folder-level error names the folder readably
        D.index_folder(os.path.join(root, os.fsdecode(b"missing\xfe")))
    _assert_one_line(err, "missing\\xfe", "does not exist")


# ---------------------------------------------------------------------------------------------
# 3. symbolic links in a data folder


def _linked_folder(root: Path) -> Path:
    """``train/`` with three images, a good link, and links that point nowhere or loop."""
    for i in range(3):
        _write(root / "train", f"img{i}.png", _png(_rgb(80, 80, seed=i)))
    _write(root / "test", "t0.png", _png(_rgb(80, 80, seed=9)))
    train = root / "train"
    (train / "linked.png").symlink_to("img0.png")  # a good link: read
    (train / "dangling.png").symlink_to("nowhere.png")
    (train / "self.jpg").symlink_to("self.jpg")
    (train / "ring_a.png").symlink_to("ring_b.png")
    (train / "ring_b.png").symlink_to("ring_a.png")
    (train / "up").symlink_to("..")  # a folder that contains the link
    (train / "here").symlink_to(".")
    (train / "notes.txt").symlink_to("nowhere.txt")  # not an image name: not data, ignored
    return root


def test_bad_symlinks_in_a_data_folder_are_skipped_with_one_warning(tmp_path: Path) -> None:
    root = _linked_folder(tmp_path / "data")
    expected = {"dangling.png": "pointing nowhere", "self.jpg": "loop", "ring_a.png": "loop",
                "ring_b.png": "loop", "up": "contains the link", "here": "contains the link"}
    path = tmp_path / "data_index.json"
    for load in (lambda: D.index_folder(root, path), lambda: D.index_folder(root, path),
                 lambda: D.load_dataset(str(root)), lambda: D.image_files(root / "train")):
        loaded, messages = _data_warnings(load)
        assert len(messages) == 1, messages
        for name, why in expected.items():
            assert f"train/{name} (symbolic link" in messages[0] and why in messages[0].split(
                f"train/{name} ")[1].split(";")[0], (name, messages[0])
        assert "notes.txt" not in messages[0]
    index, _ = _data_warnings(lambda: D.index_folder(root, path))
    assert [im.name for im in index.train] == ["img0.png", "img1.png", "img2.png", "linked.png"]
    assert {Path(d["file"]).name for d in index.dropped} == set(expected)
    ds, _ = _data_warnings(lambda: D.load_dataset(str(root)))
    assert [n for n, _ in ds.train] == [im.name for im in index.train]


@pytest.mark.parametrize("case", ["root_dangling", "root_loop", "train_dangling", "test_loop",
                                  "train_to_root", "train_dangling_looks_flat", "only_bad_links"])
def test_a_data_folder_that_is_a_bad_symlink_is_a_one_line_error(tmp_path: Path, case: str) -> None:
    root = tmp_path / "data"
    good = tmp_path / "images"
    for i in range(3):
        _write(good, f"img{i}.png", _png(_rgb(80, 80, seed=i)))
    needles: tuple[str, ...]
    if case == "root_dangling":
        root.symlink_to(tmp_path / "gone")
        needles = ("data", "pointing nowhere")
    elif case == "root_loop":
        root.symlink_to(root)
        needles = ("data", "symbolic link loop")
    elif case == "train_dangling":
        root.mkdir()
        (root / "train").symlink_to(tmp_path / "gone")
        (root / "test").symlink_to(good)
        needles = ("train", "pointing nowhere")
    elif case == "test_loop":
        root.mkdir()
        (root / "train").symlink_to(good)
        (root / "test").symlink_to("test")
        needles = ("test", "symbolic link loop")
    elif case == "train_to_root":
        root.mkdir()
        (root / "train").symlink_to(".")
        (root / "test").symlink_to(good)
        needles = ("train", "contains the link")
    elif case == "train_dangling_looks_flat":  # not silently taken for a flat folder
        root.mkdir()
        for i in range(3):
            _write(root, f"img{i}.png", _png(_rgb(80, 80, seed=i)))
        (root / "train").symlink_to(tmp_path / "gone")
        needles = ("train", "pointing nowhere")
    else:
        root.mkdir()
        (root / "a.png").symlink_to("nowhere.png")
        (root / "b.png").symlink_to("b.png")
        needles = ("data", "none of its 2 image files", "a.png", "pointing nowhere")
    for load in (lambda: D.index_folder(root), lambda: D.load_dataset(str(root))):
        with pytest.raises(D.DataError) as err:
            load()
        _assert_one_line(err, *needles)


def test_load_image_names_a_bad_symlink(tmp_path: Path) -> None:
    (tmp_path / "loop.png").symlink_to("loop.png")
    (tmp_path / "dangling.png").symlink_to("nowhere.png")
    with pytest.raises(D.DataError) as err:
        D.load_image(tmp_path / "loop.png")
    _assert_one_line(err, "loop.png", "symbolic link loop")
    assert "corrupt" not in str(err.value)
    with pytest.raises(D.DataError) as err:
        D.load_image(tmp_path / "dangling.png")
    _assert_one_line(err, "dangling.png", "pointing nowhere", "nowhere.png")


# ---------------------------------------------------------------------------------------------
# the built-in set


def test_builtin_image_scikit_image_cannot_load_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import skimage.data

    def damaged() -> np.ndarray:
        raise OSError("image file is truncated (12 bytes not processed)")

    monkeypatch.setattr(skimage.data, "chelsea", damaged)
    with pytest.raises(D.DataError) as err:
        D.builtin_images(["chelsea"])
    _assert_one_line(err, "chelsea", "truncated", "reinstall scikit-image")
    monkeypatch.setattr(skimage.data, "chelsea", lambda: np.zeros((4, 4), np.uint8))
    with pytest.raises(D.DataError) as err:
        D.builtin_images(["chelsea"])
    _assert_one_line(err, "chelsea", "not 8-bit RGB")
