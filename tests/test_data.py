"""Tests for energylab.data: decoding, the built-in set, folders, sampling, padding, bad input."""

from __future__ import annotations

import io
import itertools
import json
import os
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from energylab import data as D
from energylab.config import TrainConfig

# ---------------------------------------------------------------------------------------------
# helpers


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: Path, arr: np.ndarray, mode: str | None = None, **kw: object) -> Path:
    im = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
    im.save(path, **kw)
    return path


def _png16(arr: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour): ``arr`` is (H, W, C)."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))

    def chunk(tag: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(tag + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _assert_one_line(err: pytest.ExceptionInfo[D.DataError], *needles: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg and "\r" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def _folder(root: Path, n: int, size: int = 80, start: int = 0) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    names = [f"img{i:02d}.png" for i in range(start, start + n)]
    for i, name in enumerate(names):
        _save(root / name, _rgb(size, size + i, seed=i))
    return names


# ---------------------------------------------------------------------------------------------
# decoding


def test_rgb_png_exact(tmp_path: Path) -> None:
    a = _rgb(7, 9)
    x = D.load_image(_save(tmp_path / "a.png", a))
    assert x.dtype == torch.float32 and x.shape == (3, 7, 9)
    assert torch.equal(x, torch.from_numpy(a).permute(2, 0, 1).float() / 255)


def test_grayscale_and_bilevel(tmp_path: Path) -> None:
    g = np.arange(60, dtype=np.uint8).reshape(6, 10) * 4
    x = D.load_image(_save(tmp_path / "g.png", g))
    assert x.shape == (3, 6, 10)
    for c in range(3):
        assert torch.equal(x[c], torch.from_numpy(g).float() / 255)
    b = D.load_image(_save(tmp_path / "b.png", g > 100, mode="1"))
    assert torch.equal(b[0], torch.from_numpy(g > 100).float())


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    im = Image.new("P", (4, 2))
    im.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0] + [0] * (256 * 3 - 9))
    im.putdata([0, 1, 2, 0, 1, 2, 0, 1])
    im.save(tmp_path / "p.png")
    x = D.load_image(tmp_path / "p.png")
    assert x[:, 0, 0].tolist() == [1, 0, 0] and x[:, 0, 1].tolist() == [0, 0, 1]
    im.save(tmp_path / "pt.png", transparency=1)  # index 1 (blue) transparent -> white
    y = D.load_image(tmp_path / "pt.png")
    assert y[:, 0, 1].tolist() == [1, 1, 1] and y[:, 0, 2].tolist() == [0, 1, 0]
    im.save(tmp_path / "p.gif")
    assert torch.equal(D.load_image(tmp_path / "p.gif"), x)


def test_alpha_composited_over_white(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (255, 0, 0, 0)  # fully transparent -> white
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black -> grey
    x = D.load_image(_save(tmp_path / "rgba.png", rgba))
    assert x.shape == (3, 2, 2)
    assert x[:, 0, 0].tolist() == [1, 0, 0]
    assert x[:, 0, 1].tolist() == [1, 1, 1]
    assert torch.allclose(x[:, 1, 0], torch.full((3,), 1 - 128 / 255))
    la = np.array([[[0, 0], [200, 255]]], np.uint8)  # (1, 2, 2): L, A
    y = D.load_image(_save(tmp_path / "la.png", la, mode=None))
    assert y[:, 0, 0].tolist() == [1, 1, 1]
    assert torch.allclose(y[:, 0, 1], torch.full((3,), 200 / 255))


def test_cmyk(tmp_path: Path) -> None:
    im = Image.new("CMYK", (3, 1))
    im.putdata([(0, 0, 0, 0), (0, 0, 0, 255), (255, 0, 0, 0)])
    im.save(tmp_path / "c.tif")
    x = D.load_image(tmp_path / "c.tif")
    assert x.shape == (3, 1, 3)
    assert x[:, 0, 0].tolist() == [1, 1, 1]  # no ink: white
    assert x[:, 0, 1].tolist() == [0, 0, 0]  # full black ink
    assert x[:, 0, 2].tolist() == [0, 1, 1]  # cyan
    im.save(tmp_path / "c.jpg", quality=95)
    y = D.load_image(tmp_path / "c.jpg")
    assert y.shape == (3, 1, 3) and 0 <= y.min() and y.max() <= 1


def test_16bit_grayscale_png_true_range(tmp_path: Path) -> None:
    vals = np.array([[0, 255, 1000, 32768, 65535]], np.uint16)
    path = _save(tmp_path / "g16.png", vals)
    assert Image.open(path).mode == "I;16"
    x = D.load_image(path)
    expected = torch.from_numpy(vals.astype(np.float64) / 65535).float()
    for c in range(3):
        assert torch.allclose(x[c], expected, atol=1e-7)
    assert x[0, 0, 1] < 0.004  # 255 of 65535 is dark, not white (no 8-bit clipping)
    assert 0.015 < x[0, 0, 2] < 0.016


def test_16bit_colour_png_scaled_not_clipped(tmp_path: Path) -> None:
    rgb = np.array([[[0, 0x8000, 0xFFFF], [0x4000, 0x00FF, 0x1234]]], np.uint16)
    (tmp_path / "c16.png").write_bytes(_png16(rgb, color_type=2))
    x = D.load_image(tmp_path / "c16.png")
    assert x.shape == (3, 1, 2)
    # Pillow keeps the high byte: scaled by 65535 at 8-bit precision, never clipped to 1.
    assert torch.allclose(x[:, 0, 0], torch.tensor([0, 128 / 255, 1]))
    assert torch.allclose(x[:, 0, 1], torch.tensor([64 / 255, 0, 18 / 255]))
    assert torch.allclose(x.permute(1, 2, 0), torch.from_numpy(rgb / 65535).float(), atol=1 / 255)
    rgba = np.array([[[0, 0, 0, 0x8000]]], np.uint16)  # half-transparent black
    (tmp_path / "c16a.png").write_bytes(_png16(rgba, color_type=6))
    assert torch.allclose(D.load_image(tmp_path / "c16a.png"), torch.full((3, 1, 1), 127 / 255))


def test_16bit_pgm_uses_its_maxval(tmp_path: Path) -> None:
    body = np.array([0, 4095, 2048], ">u2").tobytes()
    (tmp_path / "g.pgm").write_bytes(b"P5\n3 1\n4095\n" + body)
    x = D.load_image(tmp_path / "g.pgm")
    assert torch.allclose(x[0, 0], torch.tensor([0, 1, 2048 / 4095]), atol=1e-4)


def test_float_and_int32_tiffs(tmp_path: Path) -> None:
    f = np.array([[0.0, 0.25, 1.0]], np.float32)
    Image.fromarray(f).save(tmp_path / "f.tif")
    assert torch.equal(D.load_image(tmp_path / "f.tif")[1, 0], torch.from_numpy(f[0]))
    Image.fromarray(f * 255).save(tmp_path / "f255.tif")
    with pytest.raises(D.DataError) as err:
        D.load_image(tmp_path / "f255.tif")
    _assert_one_line(err, "f255.tif", "[0, 1]")
    Image.fromarray(np.array([[0, 70000]], np.int32)).save(tmp_path / "i32.tif")
    with pytest.raises(D.DataError) as err:
        D.load_image(tmp_path / "i32.tif")
    _assert_one_line(err, "i32.tif", "65535")


def test_jpeg_close_to_source(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:48, 0:64]
    a = np.stack([yy * 5, xx * 4, (yy + xx) * 2], -1).astype(np.uint8)
    x = D.load_image(_save(tmp_path / "a.jpg", a, quality=95))
    ref = torch.from_numpy(a).permute(2, 0, 1).float() / 255
    assert x.shape == (3, 48, 64)
    assert (x - ref).abs().mean() < 0.01


def test_exif_orientation_applied(tmp_path: Path) -> None:
    im = Image.fromarray(_rgb(10, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(tmp_path / "o.jpg", exif=exif.tobytes())
    assert D.load_image(tmp_path / "o.jpg").shape == (3, 30, 10)


@pytest.mark.parametrize(
    "case", ["missing", "text", "truncated", "truncated_jpeg", "corrupt", "dir"]
)
def test_load_image_bad_files(tmp_path: Path, case: str) -> None:
    png = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(png, format="PNG")
    jpg = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(jpg, format="JPEG")
    path = tmp_path / f"{case}.png"
    if case == "text":
        path.write_text("hello\nworld\n")
    elif case == "truncated":
        path.write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    elif case == "truncated_jpeg":
        path = tmp_path / "t.jpg"
        path.write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 2])
    elif case == "corrupt":
        raw = bytearray(png.getvalue())
        raw[60:200] = bytes(140)  # zero out the start of the compressed pixel data
        path.write_bytes(bytes(raw))
    elif case == "dir":
        path.mkdir()
    with pytest.raises(D.DataError) as err:
        D.load_image(path)
    _assert_one_line(err, path.name)


def test_data_error_is_one_line() -> None:
    err = D.DataError("a\nb\r\nc")
    assert isinstance(err, ValueError) and str(err) == "a b c"


# ---------------------------------------------------------------------------------------------
# built-in set


@pytest.fixture(scope="module")
def builtin() -> D.Dataset:
    """The built-in dataset, loaded with network connections forbidden."""
    mp = pytest.MonkeyPatch()

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the built-in data set tried to use the network")

    mp.setattr(socket.socket, "connect", refuse)
    try:
        return D.load_dataset("builtin")
    finally:
        mp.undo()


def test_builtin_split_offline(builtin: D.Dataset) -> None:
    assert builtin.source == "builtin" and builtin.layout == "builtin"
    assert not set(D.BUILTIN_TRAIN) & set(D.BUILTIN_TEST)
    assert len(D.BUILTIN_TEST) >= 2
    assert [n for n, _ in builtin.train] == list(D.BUILTIN_TRAIN)
    assert [n for n, _ in builtin.test] == list(D.BUILTIN_TEST)
    sizes = {n: tuple(x.shape) for n, x in builtin.train + builtin.test}
    assert sizes["astronaut"] == (3, 512, 512)
    assert sizes["stereo_motorcycle"] == (3, 500, 741)
    assert sizes["chelsea"] == (3, 300, 451)
    for _, x in builtin.train + builtin.test:
        assert x.dtype == torch.float32 and x.is_contiguous()
        assert 0 <= x.min() and x.max() <= 1 and x.std() > 0.02
        assert (x[0] - x[1]).abs().mean() > 0.005  # colour, not grey


def test_builtin_images_unknown_name() -> None:
    with pytest.raises(D.DataError) as err:
        D.builtin_images(["camera"])
    _assert_one_line(err, "'camera'", "astronaut")


def test_builtin_patch_too_large() -> None:
    with pytest.raises(D.DataError) as err:
        D.load_dataset("builtin", patch_size=450)
    _assert_one_line(err, "rocket", "427x640", "450x450")


# ---------------------------------------------------------------------------------------------
# folders


def test_compressai_layout(tmp_path: Path) -> None:
    train = _folder(tmp_path / "train", 3)
    test = _folder(tmp_path / "test", 2, size=40, start=10)
    (tmp_path / "train" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / ".hidden.png").write_text("ignored")
    ds = D.load_dataset(str(tmp_path), patch_size=64)
    assert ds.layout == "compressai" and ds.source == str(tmp_path.resolve())
    assert [n for n, _ in ds.train] == train and [n for n, _ in ds.test] == test
    expected = torch.from_numpy(_rgb(80, 81, seed=1)).permute(2, 0, 1).float() / 255
    assert torch.equal(ds.train[1][1], expected)


def test_flat_layout_split_rule(tmp_path: Path) -> None:
    names = _folder(tmp_path, 7)
    (tmp_path / "sub").mkdir()
    _save(tmp_path / "sub" / "ignored.png", _rgb(80, 80))
    ds = D.load_dataset(str(tmp_path))
    assert ds.layout == "flat"
    assert [n for n, _ in ds.test] == [names[0], names[5]]
    assert [n for n, _ in ds.train] == [n for i, n in enumerate(names) if i not in (0, 5)]
    two = _folder(tmp_path / "two", 2)
    ds2 = D.load_dataset(str(tmp_path / "two"))
    assert [n for n, _ in ds2.test] == two[:1] and [n for n, _ in ds2.train] == two[1:]


def test_single_bad_file_warns_and_is_skipped(tmp_path: Path) -> None:
    names = _folder(tmp_path, 3)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.warns(D.DataWarning, match="broken.jpg") as record:
        ds = D.load_dataset(str(tmp_path))
    assert len(record) == 1 and "\n" not in str(record[0].message)
    loaded = [n for n, _ in ds.train + ds.test]
    assert sorted(loaded) == names and "broken.jpg" not in loaded


def _bad_folder(tmp_path: Path, case: str) -> tuple[Path, tuple[str, ...]]:
    """Build one bad data folder; return it and the strings its error must contain."""
    root = tmp_path / case
    if case == "missing":
        return root, (case, "does not exist")
    if case == "file":
        tmp_path.joinpath("file").write_text("x")
        return root, ("file", "not a folder")
    root.mkdir()
    if case == "empty":
        return root, (case, "no image files")
    if case == "no_images":
        (root / "readme.txt").write_text("x")
        return root, (case, "no image files")
    if case == "all_bad":
        (root / "a.png").write_text("x")
        (root / "b.jpg").write_bytes(b"")
        return root, ("all_bad", "none of its 2", "a.png")
    if case == "one_image":
        _folder(root, 1)
        return root, (case, "at least 2")
    if case == "no_test":
        _folder(root / "train", 2)
        return root, ("test", "train/ and test/")
    if case == "empty_test":
        _folder(root / "train", 2)
        (root / "test").mkdir()
        return root, ("test", "no image files")
    if case == "small_height":
        _folder(root / "train", 1)
        _save(root / "train" / "short.png", _rgb(40, 100))
        _folder(root / "test", 1)
        return root, ("short.png", "40x100", "64x64")
    assert case == "small_width"
    _folder(root, 2)
    _save(root / "narrow.png", _rgb(100, 63))
    return root, ("narrow.png", "100x63", "64x64")


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "file",
        "empty",
        "no_images",
        "all_bad",
        "one_image",
        "no_test",
        "empty_test",
        "small_height",
        "small_width",
    ],
)
def test_bad_folders_one_line_error(tmp_path: Path, case: str) -> None:
    root, needles = _bad_folder(tmp_path, case)
    with pytest.raises(D.DataError) as err:
        D.load_dataset(str(root), patch_size=64)
    _assert_one_line(err, *needles)


# ---------------------------------------------------------------------------------------------
# training sampler


def _coded_images() -> list[torch.Tensor]:
    """Images whose pixels encode (row, column, image id), so crops can be located."""
    out = []
    for k, (h, w) in enumerate([(70, 90), (64, 64), (200, 130)]):
        rows = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w)
        cols = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w)
        out.append(torch.stack([rows, cols, torch.full((h, w), float(k))]))
    return out


def test_sampler_crops_are_real_crops() -> None:
    images, p = _coded_images(), 32
    sampler = D.TrainSampler(images, patch_size=p, batch_size=16, seed=3)
    flips, chosen, tops = [], [], set()
    for step in range(20):
        b = sampler.batch(step)
        assert b.shape == (16, 3, p, p) and b.dtype == torch.float32
        for crop in b:
            k = int(crop[2, 0, 0])
            top = int(crop[0, 0, 0])
            flipped = bool(crop[1, 0, 0] > crop[1, 0, -1])
            left = int(crop[1, 0, -1] if flipped else crop[1, 0, 0])
            ref = images[k][:, top : top + p, left : left + p]
            assert ref.shape[-2:] == (p, p)  # inside the image
            assert torch.equal(crop, ref.flip(-1) if flipped else ref)
            flips.append(flipped)
            chosen.append(k)
            tops.add((k, top))
    assert 0.3 < np.mean(flips) < 0.7
    counts = np.bincount(chosen, minlength=3) / len(chosen)
    assert np.all(np.abs(counts - 1 / 3) < 0.08)  # uniform over images, not by area
    assert len({t for k, t in tops if k == 2}) > 20


def test_sampler_is_a_pure_function_of_seed_step_rank() -> None:
    images = _coded_images()
    a = D.TrainSampler(images, 32, 8, seed=0)
    ref = [a.batch(s) for s in range(6)]
    torch.manual_seed(123)  # the global RNG must not matter
    resumed = D.TrainSampler(images, 32, 8, seed=0)
    for s in range(3, 6):
        assert torch.equal(resumed.batch(s), ref[s])
    assert torch.equal(a.batch(2), ref[2])
    assert not torch.equal(ref[0], ref[1])
    assert not torch.equal(a.batch(0, rank=1, world_size=2), ref[0])
    assert torch.equal(a.batch(0, rank=0, world_size=2), ref[0])
    assert not torch.equal(D.TrainSampler(images, 32, 8, seed=1).batch(0), ref[0])


def test_sampler_bad_arguments() -> None:
    images = _coded_images()
    with pytest.raises(D.DataError) as err:
        D.TrainSampler(images, patch_size=65, batch_size=2, seed=0)
    _assert_one_line(err, "training image 1", "64x64", "65x65")
    s = D.TrainSampler(images, 16, 2, 0)
    with pytest.raises(ValueError):
        s.batch(0, rank=2, world_size=2)
    with pytest.raises(ValueError):
        s.batch(-1)
    with pytest.raises(ValueError):
        D.TrainSampler([], 16, 2, 0)


# ---------------------------------------------------------------------------------------------
# padding, crops, probes, test batches


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(1, 2), max_size=2),
    h=st.integers(1, 70),
    w=st.integers(1, 70),
    multiple=st.sampled_from([1, 8, 16, 64]),
)
def test_pad_crop_round_trip(lead: list[int], h: int, w: int, multiple: int) -> None:
    x = torch.rand(*lead, h, w)
    padded, size = D.pad_to_multiple(x, multiple)
    assert size == (h, w)
    assert padded.shape[:-2] == x.shape[:-2]
    hp, wp = padded.shape[-2:]
    assert hp % multiple == 0 and wp % multiple == 0 and h <= hp < h + multiple
    assert w <= wp < w + multiple
    assert torch.equal(D.crop_to(padded, size), x)
    assert torch.equal(padded[..., h:, :w], x[..., h - 1 : h, :].expand(*x.shape[:-2], hp - h, w))
    assert torch.equal(
        padded[..., :, w:], padded[..., :, w - 1 : w].expand(*padded.shape[:-1], wp - w)
    )


def test_pad_noop_and_errors() -> None:
    x = torch.rand(3, 64, 128)
    padded, size = D.pad_to_multiple(x)
    assert padded is x and size == (64, 128)
    with pytest.raises(ValueError):
        D.pad_to_multiple(x, 0)
    with pytest.raises(ValueError):
        D.crop_to(x, (65, 10))


def test_center_crop() -> None:
    x = torch.arange(5 * 7, dtype=torch.float32).view(1, 5, 7)
    assert torch.equal(D.center_crop(x, 3), x[:, 1:4, 2:5])
    with pytest.raises(D.DataError) as err:
        D.center_crop(x, 6, name="tiny.png")
    _assert_one_line(err, "tiny.png", "5x7", "6x6")


def test_probe_set_fixed_rule() -> None:
    a, b = torch.rand(3, 100, 130), torch.rand(3, 64, 64)
    small = torch.rand(3, 10, 10)
    images = [("a", a), ("small", small), ("b", b)]
    # a: a 1 x 2 grid of 64 px squares, centred (top 18, lefts 1 and 65); b: one; the images take turns
    assert D.probe_regions(images, 64) == [(0, 18, 1), (2, 0, 0), (0, 18, 65)]
    torch.manual_seed(0)
    p1 = D.probe_set(images, count=5, size=64)
    torch.manual_seed(1)
    assert torch.equal(D.probe_set(images, count=5, size=64), p1)
    assert p1.shape == (3, 3, 64, 64)  # only 3 regions exist
    assert torch.equal(p1[0], a[:, 18:82, 1:65])
    assert torch.equal(p1[1], b)
    assert torch.equal(p1[2], a[:, 18:82, 65:129])
    assert D.probe_set(images, count=2, size=64).shape[0] == 2
    p1.zero_()
    assert a.abs().sum() > 0  # a new tensor, not views into the images
    with pytest.raises(D.DataError) as err:
        D.probe_set([("small", small)], size=64)
    _assert_one_line(err, "small", "10x10")


def test_probe_set_defaults_on_the_builtin_images() -> None:
    dataset = D.load_dataset("builtin", 64)
    config = TrainConfig(out=Path("unused"))
    images = dataset.test + dataset.train
    probe = D.probe_set(images, config.probe_count, config.probe_size)
    regions = D.probe_regions(images, config.probe_size)[: config.probe_count]
    positions = probe.shape[0] * (probe.shape[-2] // 16) * (probe.shape[-1] // 16)  # y is 16x smaller
    assert positions >= D.PROBE_MIN_POSITIONS == 8192
    assert len(set(regions)) == probe.shape[0] >= D.PROBE_MIN_REGIONS
    assert {i for i, _, _ in regions} == set(range(len(images)))  # every photograph contributes
    size = config.probe_size
    for k, (i, top, left) in enumerate(regions):  # no two regions of one image overlap
        for j, t, lft in regions[k + 1 :]:
            assert i != j or abs(top - t) >= size or abs(left - lft) >= size


def test_test_batches_whole_and_centre() -> None:
    x, y = torch.rand(3, 100, 70), torch.rand(3, 128, 64)
    whole = list(D.test_batches([("x", x), ("y", y)], None))
    assert [n for n, _, _ in whole] == ["x", "y"]
    (_, px, hx), (_, py, hy) = whole
    assert px.shape == (1, 3, 128, 128) and hx == (100, 70)
    assert torch.equal(D.crop_to(px, hx)[0], x)
    assert py.shape == (1, 3, 128, 64) and hy == (128, 64) and torch.equal(py[0], y)
    centre = list(D.test_batches([("x", x)], 48, multiple=32))
    (_, cx, hc) = centre[0]
    assert cx.shape == (1, 3, 64, 64) and hc == (48, 48)
    assert torch.equal(D.crop_to(cx, hc)[0], D.center_crop(x, 48))
    with pytest.raises(D.DataError) as err:
        list(D.test_batches([("x", x)], 80))
    _assert_one_line(err, "x", "100x70", "80x80")


# ---------------------------------------------------------------------------------------------
# indexed folders and the training stream


def _mixed_folder(root: Path) -> Path:
    """A CompressAI-layout folder whose training images cover the modes load_image converts."""
    (root / "train").mkdir(parents=True)
    _save(root / "train" / "a.png", _rgb(90, 70, seed=1))
    _save(root / "train" / "b.jpg", _rgb(64, 100, seed=2), quality=90)
    _save(root / "train" / "c.png", np.dstack([_rgb(80, 80, seed=3), _rgb(80, 80, seed=4)[..., :1]]))
    _save(root / "train" / "d.png", _rgb(72, 66, seed=5)[..., 0])  # grayscale
    im = Image.fromarray(_rgb(70, 96, seed=6)).quantize(16)
    im.info["transparency"] = 3
    im.save(root / "train" / "e.png", transparency=3)  # palette with a transparent index
    (root / "train" / "f.png").write_bytes(_png16(np.random.default_rng(7).integers(
        0, 65536, (66, 75), dtype=np.uint16)[..., None], color_type=0))  # 16-bit grayscale
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 64x110, displayed 110x64
    Image.fromarray(_rgb(64, 110, seed=8)).save(root / "train" / "g.jpg", exif=exif.tobytes())
    _folder(root / "test", 2, size=70, start=20)
    return root


def _stream_batches(stream: D.TrainStream, start: int, stop: int) -> list[torch.Tensor]:
    steps, batches = zip(*stream.batches(start, stop), strict=True)
    assert list(steps) == list(range(start, stop))
    return list(batches)


def test_index_reads_sizes_from_headers(tmp_path: Path) -> None:
    root = _mixed_folder(tmp_path / "data")
    ds = D.load_dataset(str(root), patch_size=48)
    index = D.index_folder(root)
    assert index.layout == ds.layout == "compressai" and index.source == ds.source
    assert [im.name for im in index.train] == [n for n, _ in ds.train]
    assert [(im.height, im.width) for im in index.train] == [tuple(x.shape[-2:]) for _, x in ds.train]
    assert ("g.jpg", 110, 64) in [(im.name, im.height, im.width) for im in index.train]
    assert all(Path(im.path).parent == root / "train" for im in index.train)
    test = index.load_test()
    assert [n for n, _ in test] == [n for n, _ in ds.test]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(test, ds.test, strict=True))


def test_flat_index_splits_as_load_dataset(tmp_path: Path) -> None:
    _folder(tmp_path, 7)
    ds, index = D.load_dataset(str(tmp_path)), D.index_folder(tmp_path)
    assert index.layout == "flat"
    assert [im.name for im in index.train] == [n for n, _ in ds.train]
    assert [im.name for im in index.test] == [n for n, _ in ds.test]


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_equals_in_memory_sampler_on_a_folder(tmp_path: Path, workers: int) -> None:
    root = _mixed_folder(tmp_path / "data")
    images = [x for _, x in D.load_dataset(str(root), patch_size=48).train]
    index = D.index_folder(root)
    for rank in (0, 1):
        ref = D.TrainSampler(images, 48, 6, seed=5)
        stream = D.TrainStream(index, 48, 6, seed=5, rank=rank, world_size=2, workers=workers)
        cached = D.TrainStream(index, 48, 6, seed=5, rank=rank, world_size=2, workers=workers,
                               cache=True)
        got, got_cached = _stream_batches(stream, 0, 5), _stream_batches(cached, 0, 5)
        for step in range(5):
            expected = ref.batch(step, rank, 2)
            assert torch.equal(got[step], expected) and torch.equal(got_cached[step], expected)
    sizes = [(im.height, im.width) for im in index.train]
    used = {i for step in range(5) for i, *_ in D._crop_plan(sizes, 48, 6, 5, step, 1)}
    assert used == set(range(len(index.train)))  # every mode above was streamed at least once


def test_stream_equals_sampler_on_builtin_set(builtin: D.Dataset) -> None:
    ref = D.TrainSampler([x for _, x in builtin.train], 64, 4, seed=2)
    for workers in (0, 2):
        stream = D.TrainStream(builtin, 64, 4, seed=2, workers=workers)
        assert stream.names == list(D.BUILTIN_TRAIN)
        for step, b in enumerate(_stream_batches(stream, 0, 3)):
            assert torch.equal(b, ref.batch(step))


def test_stream_resumes_exactly(tmp_path: Path) -> None:
    index = D.index_folder(_mixed_folder(tmp_path / "data"))
    whole = _stream_batches(D.TrainStream(index, 32, 4, seed=1, workers=2), 0, 7)
    resumed = _stream_batches(D.TrainStream(index, 32, 4, seed=1, workers=2), 4, 7)
    assert all(torch.equal(a, b) for a, b in zip(whole[4:], resumed, strict=True))
    endless = D.TrainStream(index, 32, 4, seed=1, workers=0).batches(5)
    assert [s for s, _ in itertools.islice(endless, 3)] == [5, 6, 7]
    assert not torch.equal(whole[0], whole[1])


def test_index_is_cached_and_rebuilt_when_files_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "data"
    _folder(root, 6)
    path = tmp_path / "run" / "index.json"
    first = D.index_folder(root, path)
    assert json.loads(path.read_text())["version"] == D.INDEX_VERSION
    real = D._read_size
    calls: list[str] = []

    def counting(p: Path) -> tuple[int, int]:
        calls.append(p.name)
        return real(p)

    monkeypatch.setattr(D, "_read_size", counting)
    assert D.index_folder(root, path) == first and calls == []  # reused: no header read
    _save(root / "img00.png", _rgb(90, 95))  # same name, new content
    os.utime(root / "img00.png", ns=(1, 1))
    rebuilt = D.index_folder(root, path)
    assert len(calls) == 6 and (rebuilt.test[0].height, rebuilt.test[0].width) == (90, 95)
    _save(root / "new.png", _rgb(80, 80))
    assert "new.png" in [im.name for im in D.index_folder(root, path).train]
    path.write_text("{not json")
    calls.clear()
    assert "new.png" in [im.name for im in D.index_folder(root, path).train] and len(calls) == 7


def test_index_skips_unidentifiable_files_with_a_warning(tmp_path: Path) -> None:
    _folder(tmp_path / "data", 4)
    (tmp_path / "data" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    for _ in range(2):  # built, then reused: the same single warning
        with pytest.warns(D.DataWarning, match="broken.jpg") as record:
            index = D.index_folder(tmp_path / "data", tmp_path / "index.json")
        assert len(record) == 1
        assert "broken.jpg" not in [im.name for im in index.train + index.test]


def test_index_bad_folders(tmp_path: Path) -> None:
    for case in ("missing", "empty", "all_bad", "one_image", "no_test"):
        root, needles = _bad_folder(tmp_path, case)
        with pytest.raises(D.DataError) as err:
            D.index_folder(root)
        _assert_one_line(err, *needles)


def test_small_images_skip_or_error(tmp_path: Path) -> None:
    _folder(tmp_path, 3, size=80)
    for i in range(7):
        _save(tmp_path / f"small{i}.png", _rgb(40, 100))
    index = D.index_folder(tmp_path)  # test: img00, small2; train: 2 large + 6 small
    with pytest.warns(D.DataWarning) as record:
        stream = D.TrainStream(index, 64, 2, seed=0, workers=0)
    assert len(record) == 1
    msg = str(record[0].message)
    assert "6 of 8" in msg and "small0.png (40x100)" in msg
    assert "small5.png (40x100), ..." in msg and "small6" not in msg
    assert stream.names == ["img01.png", "img02.png"] and stream.batch(0).shape == (2, 3, 64, 64)
    with pytest.raises(D.DataError) as err:
        D.TrainStream(index, 64, 2, seed=0, small_images="error")
    _assert_one_line(err, "6 of 8", "small0.png (40x100)", "64x64")
    with pytest.raises(D.DataError) as err:
        D.TrainStream(index, 81, 2, seed=0)
    _assert_one_line(err, "8 of 8", "81x81")


def test_bad_file_is_dropped_at_indexing_and_never_stops_the_stream(tmp_path: Path) -> None:
    _folder(tmp_path / "train", 2)
    _folder(tmp_path / "test", 1)
    jpg = io.BytesIO()
    Image.fromarray(_rgb(80, 80)).save(jpg, format="JPEG")
    (tmp_path / "train" / "t.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 2])
    with pytest.warns(D.DataWarning, match="t.jpg.*truncated") as record:
        index = D.index_folder(tmp_path)  # the header reads, the pixels do not: dropped
    assert len(record) == 1 and "t.jpg" not in [im.name for im in index.train]
    assert [d["file"] for d in index.dropped] == [str(tmp_path / "train" / "t.jpg")]
    (tmp_path / "train" / "t.jpg").unlink()
    index = D.index_folder(tmp_path)
    _save(tmp_path / "train" / "img00.png", _rgb(70, 90))  # changed after indexing
    for workers in (0, 2):
        with pytest.warns(D.DataWarning, match="img00.png.*70x90.*80x80.*index again") as record:
            batches = [b for _, b in D.TrainStream(index, 32, 8, seed=0, workers=workers).batches(0, 4)]
        assert len(record) == 1 and all(b.shape == (8, 3, 32, 32) for b in batches)


def test_stream_bad_arguments(builtin: D.Dataset) -> None:
    with pytest.raises(ValueError, match="small_images"):
        D.TrainStream(builtin, 64, 2, 0, small_images="pad")
    with pytest.raises(ValueError, match="workers"):
        D.TrainStream(builtin, 64, 2, 0, workers=-1)
    with pytest.raises(ValueError, match="rank"):
        D.TrainStream(builtin, 64, 2, 0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="step"):
        next(D.TrainStream(builtin, 64, 2, 0, workers=0).batches(-1))
    assert 0 <= D.default_workers() <= 4


@pytest.mark.parametrize("seed", range(5))
def test_probe_regions_water_fill(seed):
    """Among the first ``count`` regions no image gives more than one region beyond another image
    that still had a square left (an even share wherever the images allow it)."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(64, 700, (7, 2), generator=g).tolist()
    images = [(f"im{i}", torch.zeros(3, h, w)) for i, (h, w) in enumerate(sizes)]
    available = [(h // 64) * (w // 64) for h, w in sizes]
    for count in (1, 7, 20, sum(available)):
        regions = D.probe_regions(images, 64)[:count]
        taken = [sum(r[0] == i for r in regions) for i in range(len(images))]
        assert sum(taken) == min(count, sum(available))
        for i in range(len(images)):
            for j in range(len(images)):
                if taken[j] < available[j]:
                    assert taken[i] <= taken[j] + 1, (count, taken, available)
