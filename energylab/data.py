"""Images for training and evaluation: loading, the built-in set, folders, crops and padding.

Every image is returned as a ``float32`` tensor of shape ``(3, H, W)`` with values in ``[0, 1]``.
Two ways to train from a data source:

* in memory: :func:`load_dataset` decodes every image once and keeps the tensors (the built-in
  set takes about 53 MB); :class:`TrainSampler` crops them. For the built-in set and small folders.
* streaming: :func:`index_folder` reads a folder's file list and image sizes, and decodes every
  file once to drop those whose pixels do not decode, into a small JSON index reused while the
  files are unchanged (no second decoding); :class:`TrainStream` decodes each crop from its file
  in ``DataLoader`` workers, so memory does not grow with the folder (``cache=True`` holds a
  small folder's images in memory instead).
  Its batches are :class:`TrainSampler`'s, bit for bit, for any number of workers.
  Training images smaller than the patch are skipped with one warning (or refused:
  ``small_images="error"``); the test images stay small and are decoded into memory
  (:meth:`DataIndex.load_test`).

Loading (:func:`load_image`, through Pillow; the first frame of a multi-frame file; the EXIF
orientation tag is applied):

* grayscale (``1``, ``L``) is repeated on the three channels; palette (``P``) images are expanded;
  ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` and ``RGBX`` go through Pillow's conversion to ``RGB``;
* transparency (``LA``, ``PA``, ``RGBA``, ``RGBa``, a palette with a transparent index) is
  **composited over a white background**: ``rgb * alpha + 1 * (1 - alpha)``;
* 16-bit grayscale (``I;16*``) is divided by 65535, not clipped to 255; ``I`` (32-bit integer:
  16-bit PGM/PPM, which Pillow stores rescaled to ``0..65535``, or integer TIFF) is divided by
  65535 and must lie in ``[0, 65535]``; ``F`` (32-bit float) must already lie in ``[0, 1]``.
  Anything outside those ranges is an error rather than being clipped.
* 16-bit *colour* PNGs are reduced by Pillow to their high byte, i.e. correctly scaled, at 8-bit
  precision.

Where the data comes from (:func:`load_dataset`):

* ``"builtin"``: colour photographs that ship inside scikit-image (no download), split into
  :data:`BUILTIN_TRAIN` and :data:`BUILTIN_TEST`.
* a folder in CompressAI's layout, ``DIR/train/`` and ``DIR/test/`` (both required once either
  exists); or a flat folder of images, sorted by file name, of which every
  :data:`FLAT_TEST_EVERY`-th readable image, starting with the first, goes to test and the rest to
  train (so there is always at least one test image; at least two readable images are needed).
  Only the folder's own files are read, not its subfolders; a file counts as an image by its
  extension (any Pillow can open, case-insensitive); hidden files are ignored.

Bad input, and what it does:

* :class:`DataError` (a ``ValueError``, one-line message naming the file or folder): a missing
  folder, a folder with no image files, a folder none of whose image files can be read, a flat
  folder with fewer than two readable images, a CompressAI folder lacking ``train/`` or ``test/``,
  a data folder, ``train/`` or ``test/`` that is a symbolic link pointing nowhere or looping, a
  training image smaller than the patch in either dimension (it is **not** skipped), an image
  with out-of-range 32-bit values, a built-in image scikit-image cannot load (its installation
  damaged), and every failure of :func:`load_image` called directly.
* one :class:`DataWarning` naming the files, which are then skipped: image files that cannot be
  read (not an image, corrupt, truncated, out of range) in a folder where at least one image can
  be, and symbolic links with an image's extension that point nowhere or loop, or links to a
  folder that contains them (a loop; subfolders are never read anyway). :func:`index_folder`
  records them in :attr:`DataIndex.dropped` and its JSON.
* file and folder names that are not valid UTF-8: read all the same, but *shown* (in names,
  messages, :attr:`DataIndex.source` and every JSON) with the undecodable bytes as ``\\xNN``
  escapes (``b"bad\\xff.png"`` is named ``bad\\xff.png``), so that no text holds the lone
  surrogates Python decodes them to (they fail to print on a UTF-8 console and are not valid
  JSON). :attr:`IndexedImage.path` stays the real path.

A file that stops decoding after it was indexed (it changed; so does one whose size differs from
the indexed one) never stops a stream: each of its crops is replaced by a crop of another image
chosen by a rule of ``(seed, step, rank, slot)`` alone, with one :class:`DataWarning` naming the
file (see :class:`TrainStream`).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import stat
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor

__all__ = [
    "BUILTIN_TEST",
    "BUILTIN_TRAIN",
    "FLAT_TEST_EVERY",
    "INDEX_VERSION",
    "SMALL_IMAGES",
    "DataError",
    "DataIndex",
    "DataWarning",
    "Dataset",
    "IndexedImage",
    "TrainSampler",
    "TrainStream",
    "builtin_images",
    "center_crop",
    "crop_to",
    "default_workers",
    "image_extensions",
    "index_folder",
    "load_dataset",
    "load_image",
    "pad_to_multiple",
    "PROBE_MIN_POSITIONS",
    "PROBE_MIN_REGIONS",
    "probe_regions",
    "probe_set",
    "test_batches",
]

BUILTIN_TRAIN: tuple[str, ...] = (
    "astronaut",  # 512 x 512: portrait, flag, spacecraft
    "rocket",  # 427 x 640: launch pad, sky
    "hubble_deep_field",  # 872 x 1000: galaxies on black
    "retina",  # 1411 x 1411: fundus photograph (black surround)
    "immunohistochemistry",  # 512 x 512: stained tissue, microscope
    "stereo_motorcycle",  # 500 x 741: the left view of the stereo pair
)
"""``skimage.data`` names of the built-in training images (sizes are H x W)."""

BUILTIN_TEST: tuple[str, ...] = (
    "chelsea",  # 300 x 451: cat, fur texture
    "coffee",  # 400 x 600: cup on a table, smooth shading
)
"""``skimage.data`` names of the built-in test images (sizes are H x W); small, so evaluating
whole images stays quick on a CPU."""

FLAT_TEST_EVERY = 5
"""In a flat folder, readable images number 0, 5, 10, ... (sorted by name) go to test."""


_ORIENTATION = 0x0112  # the EXIF orientation tag
_T = TypeVar("_T")
_I = TypeVar("_I", Image.Image, Tensor)


class DataError(ValueError):
    """Bad input data; the message is one line naming the file or folder and what is wrong.

    ``reason`` is the message without the file's name when the error is about one file (else the
    whole message). Both are printable text (see :func:`_printable`).
    """

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(_printable(_one_line(message)))
        self.reason: str = self.args[0] if reason is None else _printable(_one_line(reason))


class DataWarning(UserWarning):
    """Unusable image files were skipped (the message names them and says why)."""


def _warn(message: str, stacklevel: int) -> None:
    """A one-line, printable :class:`DataWarning` (``stacklevel`` counted from the caller)."""
    warnings.warn(_printable(_one_line(message)), DataWarning, stacklevel=stacklevel + 1)


@dataclass
class Dataset:
    """Decoded images, each ``(name, image)`` with ``image`` a ``(3, H, W)`` float32 tensor.

    ``name`` is the ``skimage.data`` name for the built-in set, else the file name.
    ``source`` is ``"builtin"`` or the folder's absolute path; ``layout`` is ``"builtin"``,
    ``"compressai"`` (``train/`` + ``test/``) or ``"flat"``.
    """

    train: list[tuple[str, Tensor]]
    test: list[tuple[str, Tensor]]
    source: str
    layout: str = "builtin"


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def _printable(text: str) -> str:
    """``text`` with the lone surrogates of undecodable file-name bytes (``os.fsdecode``'s
    ``surrogateescape``) written as ``\\xNN``: valid Unicode, so it prints on any console and
    goes into JSON that strict parsers accept. Text without surrogates is returned unchanged."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte: show its code point
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def _shown(path: str | bytes | os.PathLike) -> str:
    """A path as text for names, messages and JSON (:func:`_printable`; bytes accepted)."""
    return _printable(os.fsdecode(path))


def _hw(x: Tensor) -> str:
    return f"{x.shape[-2]}x{x.shape[-1]} (HxW)"


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions (with the dot) of the formats Pillow can open here."""
    return frozenset(
        ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN
    )


# ---------------------------------------------------------------------------------------------
# Decoding


def _to_array(im: Image.Image, where: str) -> np.ndarray:
    """``(H, W, C)`` float32 in ``[0, 1]`` with ``C`` in {1, 2, 3, 4} (gray, gray+A, RGB, RGBA)."""
    mode = im.mode
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.float32)[..., None] / 65535.0
    if mode in ("I", "F"):
        a = np.asarray(im)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if mode == "I":
            if lo < 0 or hi > 65535:
                raise DataError(
                    f"{where}: 32-bit integer image with values in [{lo:g}, {hi:g}], outside "
                    "[0, 65535]; save it as 8- or 16-bit"
                )
            return a.astype(np.float32)[..., None] / 65535.0
        if not (np.isfinite(a).all() and lo >= 0.0 and hi <= 1.0):
            raise DataError(
                f"{where}: float image with values in [{lo:g}, {hi:g}], not in [0, 1]; "
                "save it as 8- or 16-bit"
            )
        return a.astype(np.float32)[..., None]
    if mode == "1":
        im = im.convert("L")
    elif mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode in ("La", "PA", "RGBa"):
        im = im.convert("RGBA")
    elif mode not in ("L", "LA", "RGB", "RGBA"):  # CMYK, YCbCr, LAB, HSV, RGBX
        im = im.convert("RGB")
    return np.asarray(im).astype(np.float32).reshape(im.height, im.width, -1) / 255.0


def _array_to_rgb(a: np.ndarray) -> Tensor:
    """``(H, W, C)`` in ``[0, 1]`` -> ``(3, H, W)`` float32, alpha composited over white."""
    if a.shape[-1] in (2, 4):
        alpha = a[..., -1:]
        a = a[..., :-1] * alpha + (1.0 - alpha)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32))


def _file_error(where: str, reason: str) -> DataError:
    """The one-line error ``"{where}: {reason}"`` about one file, with its ``reason`` apart."""
    return DataError(f"{where}: {reason}", reason=reason)


def _link_problem(path: Path) -> str | None:
    """Why the symbolic link ``path`` cannot be used, or ``None`` (not a link, or a good one).

    A link that points nowhere (dangling), one that loops (``ELOOP``: to itself, or round a chain
    of links), or one to a folder that contains the link (following it would walk in circles).
    """
    try:
        target = _shown(os.readlink(path))
    except OSError:
        return None  # not a symbolic link (or gone)
    try:
        st = path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"symbolic link loop (it points to {target!r}, which leads back to itself)"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return f"symbolic link pointing nowhere (to {target!r}, which does not exist)"
        return f"symbolic link to {target!r} that cannot be followed ({exc.strerror})"
    if stat.S_ISDIR(st.st_mode):
        real, here = path.resolve(), path.parent.resolve()
        if real == here or real in here.parents:
            return (f"symbolic link to {target!r}, a folder that contains the link "
                    "(a loop; not followed)")
    return None


@contextlib.contextmanager
def _reading(path: str | bytes | os.PathLike) -> Iterator[str]:
    """Turn Pillow's and the OS's errors while reading ``path`` into one-line DataErrors; yields
    the path as shown in messages (:func:`_shown`)."""
    where = _shown(path)
    try:
        yield where
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise _file_error(where, f"image too large ({exc})") from None
    except Image.UnidentifiedImageError:
        raise _file_error(where, "not an image (Pillow cannot identify the file)") from None
    except OSError as exc:
        if exc.errno is None:  # Pillow's own errors ("image file is truncated", ...)
            raise _file_error(where, f"corrupt or truncated image ({type(exc).__name__}: {exc})"
                              ) from None
        link = _link_problem(Path(os.fsdecode(path)))
        if link is not None:
            raise _file_error(where, link) from None
        if isinstance(exc, FileNotFoundError):
            raise _file_error(where, "no such file") from None
        if isinstance(exc, IsADirectoryError):
            raise _file_error(where, "is a folder, not an image file") from None
        if isinstance(exc, PermissionError):
            raise _file_error(where, "cannot read the file (permission denied)") from None
        raise _file_error(where, f"cannot read the file ({exc.strerror or exc})") from None
    except Exception as exc:  # a corrupt file can make Pillow's parsers raise
        # anything (SyntaxError, EOFError, ValueError, struct.error, IndexError, ...)
        raise _file_error(where, f"corrupt or truncated image ({type(exc).__name__}: {exc})"
                          ) from None


def load_image(path: str | bytes | os.PathLike) -> Tensor:
    """Decode an image file into a ``(3, H, W)`` float32 tensor in ``[0, 1]``.

    Conversions are those of the module docstring (alpha is composited over white; 16-bit
    grayscale is divided by 65535). ``path`` may be ``bytes`` or name a file whose name is not
    valid UTF-8 (messages show such bytes as ``\\xNN``).

    Raises:
        DataError: the file is missing, is a symbolic link pointing nowhere or looping, is not an
            image Pillow can identify, is corrupt or truncated, is too large for Pillow's
            decompression-bomb limit, or holds 32-bit values outside the supported range. The
            message names the file.
    """
    with _reading(path) as where, Image.open(path) as im:
        im.load()
        return _array_to_rgb(_to_array(ImageOps.exif_transpose(im), where))


def _read_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` of the image :func:`load_image` would return, from the file's header only.

    EXIF orientations 5-8 swap the sides. A PNG's ``eXIf`` chunk stored after the pixel data is
    not seen here (Pillow reads it only when decoding); :func:`_decoded_size` sees it.

    Raises:
        DataError: as :func:`load_image`, for what the header shows.
    """
    with _reading(path), Image.open(path) as im:
        w, h = im.size
        if im.format == "PNG" and "exif" not in im.info:
            return h, w  # Pillow's PNG getexif() would decode the whole image
        return (w, h) if im.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8) else (h, w)


def _decoded_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` of ``load_image(path)``, found by decoding every pixel once (without the float
    conversion, except for 32-bit modes, whose range :func:`load_image` checks).

    Raises:
        DataError: as :func:`load_image`.
    """
    with _reading(path) as where, Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I", "F"):
            _to_array(im, where)
        return im.height, im.width


# ---------------------------------------------------------------------------------------------
# The built-in set


def _builtin_array(name: str) -> np.ndarray:
    """The photograph ``name`` of ``skimage.data`` as ``(H, W, 3)`` uint8.

    Raises:
        DataError: scikit-image cannot load it (a file of its installation missing, corrupt or
            truncated: it then tries a download, which fails offline), or it is not 8-bit RGB.
    """
    try:
        import skimage.data

        img = getattr(skimage.data, name)()
    except Exception as exc:  # whatever scikit-image's loader or its download fallback raises
        raise DataError(
            f"built-in image {name!r}: scikit-image cannot load it ({type(exc).__name__}: {exc}); "
            "its installation may be incomplete or damaged (reinstall scikit-image)"
        ) from None
    img = np.asarray(img[0] if name == "stereo_motorcycle" else img)  # (left, right, disparity)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
        raise DataError(f"built-in image {name!r}: scikit-image returned {img.dtype} of shape "
                        f"{img.shape}, not 8-bit RGB (H, W, 3)")
    return img


def builtin_images(names: Sequence[str]) -> list[tuple[str, Tensor]]:
    """Load built-in photographs from ``skimage.data``, offline, as ``(name, (3, H, W))`` pairs.

    ``names`` must come from :data:`BUILTIN_TRAIN` + :data:`BUILTIN_TEST` (the images verified to
    ship inside scikit-image); ``"stereo_motorcycle"`` is its left view.

    Raises:
        DataError: an unknown name; scikit-image cannot load the image (naming it).
    """
    known = BUILTIN_TRAIN + BUILTIN_TEST
    out = []
    for name in names:
        if name not in known:
            raise DataError(f"unknown built-in image {name!r}; known: {', '.join(known)}")
        a = _builtin_array(name).astype(np.float32) / 255.0
        out.append((name, _array_to_rgb(a)))
    return out


# ---------------------------------------------------------------------------------------------
# Folders


def shown_name(path: str | bytes | os.PathLike) -> str:
    """The name of a file as text for names, messages and JSON: bytes of it that are not valid
    UTF-8 as ``\\xNN`` escapes (``b"bad\\xff.png"`` -> ``"bad\\xff.png"``); any other name as is."""
    return _printable(os.path.basename(os.fsdecode(path)))


def _dropped(path: Path, reason: str) -> dict[str, str]:
    return {"file": _shown(path.absolute()), "reason": reason}


def _scan(folder: Path) -> tuple[list[Path], list[dict[str, str]]]:
    """``(image files, unusable links)`` of ``folder``'s own entries, files sorted by name.

    An image file is a non-hidden entry with an image extension that is a file or a link to one.
    Unusable links (:func:`_link_problem`) are those with an image extension and links to a
    folder containing them, each as ``{"file", "reason"}``; other entries are ignored.

    Raises:
        DataError: the folder cannot be listed.
    """
    exts = image_extensions()
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise DataError(f"{_shown(folder)}: cannot list the folder ({exc.strerror or exc})") from None
    files: list[Path] = []
    links: list[dict[str, str]] = []
    for p in entries:
        if p.name.startswith("."):
            continue
        image = p.suffix.lower() in exts
        problem = _link_problem(p) if p.is_symlink() else None
        if problem is not None:
            if image or p.is_dir():  # a bad link of an image's name, or a folder loop
                links.append(_dropped(p, problem))
        elif image and p.is_file():
            files.append(p)
    return files, links


def image_files(folder: str | bytes | os.PathLike) -> list[Path]:
    """The image files of ``folder`` (its own, by extension, not hidden), sorted by name, as
    :func:`load_dataset` and :func:`index_folder` read them.

    Symbolic links among them that point nowhere or loop, and links to a folder containing them,
    are left out with one :class:`DataWarning` naming each and why (never silently).

    Raises:
        DataError: the folder cannot be listed.
    """
    files, links = _scan(Path(os.fsdecode(folder)))
    _warn_dropped(_shown(folder), links, stacklevel=2)
    return files


_NAMED_AT_MOST = 20
"""A warning about dropped files names this many of them, then counts the rest."""


def _warn_dropped(where: str, dropped: list[dict[str, str]], stacklevel: int) -> None:
    """One :class:`DataWarning` naming the ``dropped`` files of ``where`` and why (none: silent)."""
    if not dropped:
        return
    named = "; ".join(f"{d['file']} ({d['reason']})" for d in dropped[:_NAMED_AT_MOST])
    more = f"; and {len(dropped) - _NAMED_AT_MOST} more" if len(dropped) > _NAMED_AT_MOST else ""
    count = "1 file" if len(dropped) == 1 else f"{len(dropped)} files"
    _warn(f"{where}: skipping {count} that cannot be used: {named}{more}", stacklevel + 1)


def _no_images(folder: Path) -> DataError:
    return DataError(f"{_shown(folder)}: no image files (looked for .png, .jpg, ... by extension)")


def _none_readable(folder: Path, count: int, dropped: list[dict[str, str]]) -> DataError:
    first = dropped[0]
    return DataError(f"{_shown(folder)}: none of its {count} image files could be read; "
                     f"first: {first['file']}: {first['reason']}")


def _load_folder(folder: Path) -> tuple[list[tuple[Path, Tensor]], list[dict[str, str]]]:
    """``(readable images, dropped)`` of ``folder``, sorted by name: unreadable files and unusable
    links are ``dropped`` (``{"file", "reason"}``), for the caller's one warning.

    Raises:
        DataError: no image files, or none readable.
    """
    files, dropped = _scan(folder)
    if not files:
        if dropped:
            raise _none_readable(folder, len(dropped), dropped)
        raise _no_images(folder)
    good: list[tuple[Path, Tensor]] = []
    bad: list[dict[str, str]] = []
    for f in files:
        try:
            good.append((f, load_image(f)))
        except DataError as err:
            bad.append(_dropped(f, err.reason))
    if not good:
        raise _none_readable(folder, len(files), bad)
    return good, dropped + bad


def _check_patch(train: list[tuple[str, Tensor]], patch_size: int) -> None:
    for where, img in train:
        if img.shape[-2] < patch_size or img.shape[-1] < patch_size:
            raise DataError(
                f"{where}: training image is {_hw(img)}, smaller than the "
                f"{patch_size}x{patch_size} training patch (--patch-size)"
            )


def _resolve_folder(data: str | bytes | os.PathLike) -> tuple[Path, str, dict[str, Path]]:
    """``(root, layout, {split: folder})`` of a data folder; split ``""`` is a flat folder.

    Raises:
        DataError: a missing path, not a folder, a CompressAI layout lacking train/ or test/; the
            folder, ``train`` or ``test`` a symbolic link that points nowhere or loops.
    """
    root = Path(os.fsdecode(data)).expanduser()
    for path in (root, root / "train", root / "test"):
        problem = _link_problem(path) if path.is_symlink() else None
        if problem is not None:
            raise DataError(f"{_shown(path)}: {problem}")
    if not root.exists():
        raise DataError(f"{_shown(root)}: data folder does not exist (pass a folder or 'builtin')")
    if not root.is_dir():
        raise DataError(f"{_shown(root)}: not a folder (pass a folder of images or 'builtin')")
    train_dir, test_dir = root / "train", root / "test"
    if not (train_dir.is_dir() or test_dir.is_dir()):
        return root, "flat", {"": root}
    for sub in (train_dir, test_dir):
        if not sub.is_dir():
            raise DataError(
                f"{_shown(sub)}: missing; a CompressAI-layout folder needs both train/ and test/"
            )
    return root, "compressai", {"train": train_dir, "test": test_dir}


def _split_flat(root: Path, readable: list[_T]) -> tuple[list[_T], list[_T]]:
    """``(train, test)`` of a flat folder's readable images, sorted by name."""
    if len(readable) < 2:
        raise DataError(
            f"{_shown(root)}: only {len(readable)} readable image; a flat folder needs at least 2 "
            f"(every {FLAT_TEST_EVERY}th, starting with the first, goes to test)"
        )
    return [f for i, f in enumerate(readable) if i % FLAT_TEST_EVERY], readable[::FLAT_TEST_EVERY]


def load_dataset(data: str | os.PathLike, patch_size: int = 64) -> Dataset:
    """Load the built-in set (``data == "builtin"``) or a folder, all images into memory.

    For folders too large to hold in memory, see :func:`index_folder` and :class:`TrainStream`.

    Args:
        data: ``"builtin"`` or a folder path (CompressAI layout or flat; see the module docstring).
        patch_size: side in pixels of the training crops; every training image must be at least
            this large in both dimensions.

    Returns:
        A :class:`Dataset` of ``(3, H, W)`` float32 tensors in ``[0, 1]``; names and ``source``
        as shown text (:func:`shown_name`).

    Raises:
        DataError: see the module docstring (one line, naming the file or folder). Unreadable
            files among readable ones, and unusable symbolic links, are skipped with one
            :class:`DataWarning` naming them instead.
    """
    if patch_size < 1:
        raise DataError(f"patch size must be a positive number of pixels, got {patch_size}")
    if data == "builtin":
        train = builtin_images(BUILTIN_TRAIN)
        _check_patch([(f"built-in image {n!r}", x) for n, x in train], patch_size)
        return Dataset(train, builtin_images(BUILTIN_TEST), "builtin", "builtin")

    root, layout, folders = _resolve_folder(data)
    loaded = {split: _load_folder(folder) for split, folder in folders.items()}
    _warn_dropped(_shown(root), [d for _, dropped in loaded.values() for d in dropped], stacklevel=2)
    if layout == "compressai":
        train_files, test_files = loaded["train"][0], loaded["test"][0]
    else:
        train_files, test_files = _split_flat(root, loaded[""][0])
    _check_patch([(_shown(p), x) for p, x in train_files], patch_size)
    return Dataset(
        [(shown_name(p), x) for p, x in train_files],
        [(shown_name(p), x) for p, x in test_files],
        _shown(root.resolve()),
        layout,
    )


# ---------------------------------------------------------------------------------------------
# Indexed folders (streaming)

INDEX_VERSION = 2
"""Version of the JSON data index written by :func:`index_folder`; another version is rebuilt
(version 1 read headers only, so it could list files whose pixels do not decode)."""

SMALL_IMAGES = ("skip", "error")
"""Policies for indexed training images smaller than the patch (see :class:`TrainStream`)."""


@dataclass(frozen=True)
class IndexedImage:
    """One image of a :class:`DataIndex`: file name as shown text (:func:`shown_name`), absolute
    path (the real one, to open; it may hold the lone surrogates of a name that is not valid
    UTF-8), and the size of the decoded image (after EXIF orientation)."""

    name: str
    path: str
    height: int
    width: int


@dataclass
class DataIndex:
    """A data folder's usable image files and their sizes; every file was decoded once, when the
    index was built, and those that do not decode are left out.

    ``source`` is the folder's absolute path (as shown text), ``layout`` ``"compressai"`` or
    ``"flat"``; ``train`` and ``test`` follow the rules of :func:`load_dataset` (a flat folder is
    split among the files that decode). ``dropped`` lists the files left out, each
    ``{"file": path as shown text, "reason": one line}``: unusable symbolic links and name clashes
    (found at each :func:`index_folder` call), then files that cannot be read or decoded (found
    when the index was built, and stored with it). A file that changes after indexing is the
    stream's to handle (:class:`TrainStream`).
    """

    train: list[IndexedImage]
    test: list[IndexedImage]
    source: str
    layout: str
    dropped: list[dict[str, str]] = field(default_factory=list)

    def load_test(self) -> list[tuple[str, Tensor]]:
        """Decode the test images into memory: ``(name, (3, H, W) float32)`` pairs, in order.

        Raises:
            DataError: a test image cannot be decoded (it changed after indexing; naming it).
        """
        return [(im.name, load_image(im.path)) for im in self.test]


def _listing(files: list[Path]) -> tuple[dict[str, tuple[Path, os.stat_result]], list[dict[str, str]]]:
    """``({shown name: (path, stat)}, dropped)`` of a folder's image files, in their order.

    Two files can show the same name only if one name is not valid UTF-8 (``b"a\\xff"`` and
    ``"a\\\\xff"``): the valid one is kept, the other dropped. So is a file that vanished since
    it was listed.
    """
    named: dict[str, tuple[Path, os.stat_result]] = {}
    dropped: list[dict[str, str]] = []
    for f in files:
        try:
            st = f.stat()
        except OSError as exc:
            dropped.append(_dropped(f, f"cannot be read ({exc.strerror or exc})"))
            continue
        name = shown_name(f)
        if name in named:
            clash = f"its name shown as text, {name!r}, is also another file's name"
            kept = named[name][0]
            if kept.name != name and f.name == name:  # keep the valid UTF-8 name
                dropped.append(_dropped(kept, clash))
                named[name] = (f, st)
            else:
                dropped.append(_dropped(f, clash))
            continue
        named[name] = (f, st)
    return named, dropped


def _fingerprint(named: dict[str, tuple[Path, os.stat_result]]) -> list[list[str | int]]:
    return [[name, st.st_size, st.st_mtime_ns] for name, (_, st) in named.items()]


def _valid_index(stored: object, named: dict[str, dict[str, tuple[Path, os.stat_result]]]) -> bool:
    """Whether a stored index's ``images`` and ``dropped`` are well formed for these files."""
    if not isinstance(stored, dict):
        return False
    images, dropped = stored.get("images"), stored.get("dropped")
    if not (isinstance(images, dict) and set(images) == set(named) and isinstance(dropped, list)):
        return False
    for split, sizes in images.items():
        if not isinstance(sizes, list) or not sizes:
            return False
        for entry in sizes:
            if not (isinstance(entry, list) and len(entry) == 3 and entry[0] in named[split]
                    and all(type(v) is int and v > 0 for v in entry[1:])):
                return False
    return all(isinstance(d, dict) and set(d) == {"file", "reason"}
               and all(isinstance(v, str) for v in d.values()) for d in dropped)


def _read_index(
    path: Path, source: str, layout: str, files: dict[str, list[list[str | int]]],
    named: dict[str, dict[str, tuple[Path, os.stat_result]]],
) -> dict | None:
    """The stored index at ``path`` if it describes exactly these files, else ``None``."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or (
        stored.get("version"), stored.get("source"), stored.get("layout"), stored.get("files")
    ) != (INDEX_VERSION, source, layout, files):
        return None
    return stored if _valid_index(stored, named) else None


def _write_index(path: Path, content: dict) -> None:
    """Write ``content`` as JSON, atomically (a reader sees the old file or the whole new one).

    Every string in it is shown text (:func:`_printable`), so the JSON holds no lone surrogate.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content, separators=(",", ":"), allow_nan=False), encoding="utf-8")
    os.replace(tmp, path)


def _check_file(path: Path) -> tuple[int, int] | str:
    """The ``(H, W)`` of ``load_image(path)`` (its header read, then every pixel decoded once), or
    the reason it cannot be read."""
    try:
        _read_size(path)  # a file Pillow cannot identify fails here, before any decoding
        return _decoded_size(path)  # the decoded size: a PNG's late eXIf can turn the image
    except DataError as err:
        return err.reason


def _check_files(files: list[Path]) -> list[tuple[int, int] | str]:
    """:func:`_check_file` of each file, in order, decoded by up to 8 threads (Pillow's decoders
    release the GIL)."""
    threads = min(8, os.cpu_count() or 1, len(files))
    if threads <= 1:
        return [_check_file(f) for f in files]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="energylab-index") as pool:
        return list(pool.map(_check_file, files))


def index_folder(
    data: str | bytes | os.PathLike, index_path: str | os.PathLike[str] | None = None
) -> DataIndex:
    """Index a data folder of any size: its usable image files and their sizes.

    The layout rules are :func:`load_dataset`'s (CompressAI ``train/`` + ``test/``, or a flat
    folder split every :data:`FLAT_TEST_EVERY`-th readable image). Every file is decoded once (by
    a few threads), so a file whose header reads but whose pixels do not (a truncated file) is
    found here, before any training, rather than when a crop of it is first drawn. With
    ``index_path``, the index is stored there as JSON and reused, without decoding anything again,
    as long as the folder's image files are unchanged (same names, byte sizes and modification
    times, checked with one ``stat`` per file); otherwise it is rebuilt and overwritten. Without
    it, nothing is written.

    Args:
        data: the folder (not ``"builtin"``: the built-in set comes from :func:`load_dataset`).
        index_path: where to keep the JSON index (the caller owns the file name), or ``None``.

    Returns:
        A :class:`DataIndex`. Files that cannot be read or decoded, unusable symbolic links and
        name clashes are left out and listed in its ``dropped`` (the JSON records the files found
        undecodable when it was built), with one :class:`DataWarning` naming them all (again when
        a stored index is reused).

    Raises:
        DataError: as :func:`load_dataset` for the folder itself (missing, no image files, none
            readable, a flat folder with fewer than two readable images, half a CompressAI layout,
            a symbolic link pointing nowhere or looping).
    """
    root, layout, folders = _resolve_folder(data)
    source = _shown(root.resolve())
    named: dict[str, dict[str, tuple[Path, os.stat_result]]] = {}
    listed: list[dict[str, str]] = []
    for split, folder in folders.items():
        found, links = _scan(folder)
        named[split], clashes = _listing(found)
        listed += links + clashes
        if not named[split]:
            bad = links + clashes
            raise _none_readable(folder, len(bad), bad) if bad else _no_images(folder)
    prints = {split: _fingerprint(files) for split, files in named.items()}
    stored = None
    if index_path is not None:
        stored = _read_index(Path(index_path), source, layout, prints, named)
    if stored is None:
        stored = {"version": INDEX_VERSION, "source": source, "layout": layout, "files": prints,
                  "images": {}, "dropped": []}
        for split, files in named.items():
            checked = _check_files([path for path, _ in files.values()])
            sizes, bad = [], []
            for (name, (path, _)), result in zip(files.items(), checked, strict=True):
                if isinstance(result, str):
                    bad.append(_dropped(path, result))
                else:
                    sizes.append([name, *result])
            if not sizes:
                raise _none_readable(folders[split], len(files), bad)
            stored["images"][split] = sizes
            stored["dropped"] += bad
        if index_path is not None:
            _write_index(Path(index_path), stored)
    dropped = listed + stored["dropped"]
    _warn_dropped(source, dropped, stacklevel=2)
    split_images = {
        split: [IndexedImage(name, str(named[split][name][0]), h, w) for name, h, w in sizes]
        for split, sizes in stored["images"].items()
    }
    if layout == "flat":
        train, test = _split_flat(root, split_images[""])
    else:
        train, test = split_images["train"], split_images["test"]
    return DataIndex(train, test, source, layout, dropped)


def _usable(index: DataIndex, patch_size: int, small_images: str) -> list[IndexedImage]:
    """The training images at least ``patch_size`` on both sides, by the small-image policy."""
    small = [im for im in index.train if im.height < patch_size or im.width < patch_size]
    if not small:
        return index.train
    first = ", ".join(f"{im.name} ({im.height}x{im.width})" for im in small[:5])
    more = ", ..." if len(small) > 5 else ""
    what = (
        f"{len(small)} of {len(index.train)} training images in {index.source} are smaller than "
        f"the {patch_size}x{patch_size} training patch: {first}{more}"
    )
    if small_images == "error" or len(small) == len(index.train):
        raise DataError(what)
    _warn(f"{what}; skipping them", 3)
    return [im for im in index.train if im.height >= patch_size and im.width >= patch_size]


def _check_indexed(image: IndexedImage, decoded: _I) -> _I:
    """``decoded`` (a PIL image or a ``(3, H, W)`` tensor) if its size is the indexed one.

    Raises:
        DataError: it is not (the file changed after indexing, or a PNG's late EXIF rotated it).
    """
    h, w = (decoded.height, decoded.width) if isinstance(decoded, Image.Image) else decoded.shape[-2:]
    if (h, w) != (image.height, image.width):
        raise _file_error(
            _shown(image.path),
            f"image is {h}x{w} (HxW) but was indexed as {image.height}x{image.width}; "
            "the file changed after indexing (index again)",
        )
    return decoded


def _decode_crop(image: IndexedImage, top: int, left: int, size: int) -> Tensor:
    """The ``size`` square at ``(top, left)`` of ``load_image(image.path)``, decoding only once.

    Every conversion of :func:`load_image` acts pixel by pixel, so cropping before converting
    gives the same values; 32-bit modes convert first, to keep their whole-image range check.

    Raises:
        DataError: the file cannot be decoded, or its size is not the indexed one.
    """
    with _reading(image.path) as where, Image.open(image.path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        _check_indexed(image, im)
        box = (left, top, left + size, top + size)
        if im.mode in ("I", "F"):
            a = _to_array(im, where)[top : top + size, left : left + size]
        else:
            a = _to_array(im.crop(box), where)
    return _array_to_rgb(a)


# ---------------------------------------------------------------------------------------------
# Training crops


def _generator(*seeds: int) -> torch.Generator:
    """A CPU generator seeded by a well-mixed hash of non-negative integers."""
    state = np.random.SeedSequence(list(seeds)).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))


class TrainSampler:
    """Random training crops whose every batch is a pure function of ``(seed, step, rank)``.

    Each call to :meth:`batch` seeds its own ``torch.Generator`` from ``(seed, step, rank)``, so a
    run resumed at any step, and any model variant trained with the same seed, sees exactly the
    same crops, independent of the global RNG and of what was drawn before. Each crop picks an
    image **uniformly** (not weighted by area: pixels of the large images are seen less often),
    a uniformly random ``patch_size`` square inside it, and a horizontal flip with probability
    1/2.

    Args:
        images: ``(3, H, W)`` tensors, each at least ``patch_size`` in both dimensions.
        patch_size: crop side in pixels.
        batch_size: crops per call, per rank.
        seed: non-negative integer.

    Raises:
        ValueError: empty ``images``, a wrongly shaped one, non-positive sizes, negative seed.
        DataError: an image smaller than the patch.
    """

    def __init__(self, images: list[Tensor], patch_size: int, batch_size: int, seed: int) -> None:
        if not images:
            raise ValueError("TrainSampler needs at least one image")
        if patch_size < 1 or batch_size < 1:
            raise ValueError(
                f"patch_size and batch_size must be >= 1, got {patch_size}, {batch_size}"
            )
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        for i, img in enumerate(images):
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"image {i} must have shape (3, H, W), got {tuple(img.shape)}")
        _check_patch([(f"training image {i}", x) for i, x in enumerate(images)], patch_size)
        self.images = images
        self.patch_size = patch_size
        self.batch_size = batch_size
        self.seed = seed

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> Tensor:
        """The crops of ``step`` for ``rank``: ``(batch_size, 3, P, P)`` float32, on the CPU.

        ``batch_size`` is per rank; ranks draw from distinct generators, so they get different
        crops, and rank 0's batch equals a single-process run's. ``world_size`` only validates
        ``rank``.

        Raises:
            ValueError: negative ``step`` or ``rank`` not in ``[0, world_size)``.
        """
        _check_step(step, rank, world_size)
        p = self.patch_size
        sizes = [(img.shape[-2], img.shape[-1]) for img in self.images]
        crops = []
        for idx, top, left, flip in _crop_plan(sizes, p, self.batch_size, self.seed, step, rank):
            crop = self.images[idx][:, top : top + p, left : left + p]
            crops.append(crop.flip(-1) if flip else crop)
        return torch.stack(crops).to(torch.float32)


def _check_step(step: int, rank: int, world_size: int) -> None:
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")


def _crop_plan(
    sizes: Sequence[tuple[int, int]], patch_size: int, batch_size: int, seed: int, step: int, rank: int
) -> list[tuple[int, int, int, bool]]:
    """``(image index, top, left, flip)`` of each crop of a batch: the one rule of both samplers."""
    g = _generator(seed, step, rank)
    which = torch.randint(len(sizes), (batch_size,), generator=g).tolist()
    u = torch.rand(batch_size, 3, generator=g, dtype=torch.float64).tolist()
    plan = []
    for idx, (ut, ul, uf) in zip(which, u, strict=True):
        h, w = sizes[idx]
        plan.append((idx, int(ut * (h - patch_size + 1)), int(ul * (w - patch_size + 1)), uf < 0.5))
    return plan


def default_workers() -> int:
    """Loader worker processes by default: ``min(4, usable CPUs - 1)``, at least 0."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(4, (cpus or 1) - 1))


class TrainStream:
    """Training batches of :class:`TrainSampler`'s crops, from memory or decoded on the fly.

    Batch ``step`` is ``TrainSampler(train images, patch_size, batch_size, seed).batch(step,
    rank, world_size)``, bit for bit, whatever ``workers`` and ``cache``: the crop positions
    come from ``(seed, step, rank)`` and the image sizes alone, and a crop decoded from its file
    equals the crop of the decoded image. So a stream started at step ``k`` continues an
    interrupted one exactly, and every variant trained with one seed sees the same data.

    Sources:

    * a :class:`Dataset` (:func:`load_dataset`, e.g. the built-in set): crops from memory.
    * a :class:`DataIndex` (:func:`index_folder`): each crop decodes its file in a
      ``DataLoader`` worker (memory independent of the folder's size); with ``cache=True`` the
      usable training images are decoded into memory once instead (small folders only: about
      ``12 * H * W`` bytes each).

    Training images of an index smaller than the patch (``small_images``): ``"skip"`` (default)
    leaves them out with one :class:`DataWarning` giving their count and the first five names;
    ``"error"`` raises a :class:`DataError` here, before any training. Either way, if no image
    is large enough, :class:`DataError`. (A :class:`Dataset` never holds such images:
    :func:`load_dataset` refuses them.)

    An indexed file that no longer decodes (it changed after indexing: truncated, replaced,
    resized) never stops the stream. Each crop drawn from it is replaced: the candidates are all
    training images in the order of a permutation drawn from ``(seed, step, rank, slot)``, each
    with a position and flip drawn from the same generator, and the first that decodes gives the
    crop. So the batches stay a function of the seed, the step, the rank and the files alone (the
    same numbers on a resumed run and for any ``workers``); the other crops of the batch are
    unchanged. The first time a file fails in this process, one :class:`DataWarning` names it and
    why, and :attr:`dropped` records it with the step. Only if no training image decodes any more
    does a batch raise :class:`DataError`.

    Args:
        data: the training images' source.
        patch_size, batch_size, seed: as :class:`TrainSampler` (``batch_size`` per rank).
        rank, world_size: this process's rank among ``world_size`` data-parallel processes.
        workers: loader processes for :meth:`batches`; ``0`` decodes in this process;
            ``None``: :func:`default_workers`.
        cache: with a :class:`DataIndex`, decode its training images into memory once.
        small_images: ``"skip"`` or ``"error"``, see above.
        prefetch: batches each worker prepares ahead.

    Attributes:
        names: the training images' names (shown text), in the order the crops index them.
        source: the data's source (:attr:`Dataset.source`, :attr:`DataIndex.source`).
        dropped: the files left out or replaced, each ``{"file", "reason"}``: the index's
            (:attr:`DataIndex.dropped`), then each file found undecodable here, with ``"step"``
            (the first step that drew it; ``None`` when found by ``cache=True``).

    Raises:
        ValueError: non-positive sizes or ``prefetch``, negative ``seed`` or ``workers``, a
            ``rank`` outside ``[0, world_size)``, an unknown ``small_images``.
        DataError: small images under ``small_images="error"`` or none large enough; with
            ``cache=True``, no training image that decodes.
    """

    def __init__(
        self,
        data: Dataset | DataIndex,
        patch_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        workers: int | None = None,
        cache: bool = False,
        small_images: str = "skip",
        prefetch: int = 2,
    ) -> None:
        _check_step(0, rank, world_size)
        if small_images not in SMALL_IMAGES:
            raise ValueError(f"small_images must be one of {SMALL_IMAGES}, got {small_images!r}")
        workers = default_workers() if workers is None else workers
        if workers < 0 or prefetch < 1:
            raise ValueError(f"workers must be >= 0 and prefetch >= 1, got {workers}, {prefetch}")
        if patch_size < 1 or batch_size < 1:
            raise ValueError(
                f"patch_size and batch_size must be >= 1, got {patch_size}, {batch_size}"
            )
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.patch_size, self.batch_size, self.seed = patch_size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.workers, self.prefetch = workers, prefetch
        self.source = data.source
        self.dropped: list[dict[str, str | int | None]] = []
        self._reported: set[str] = set()
        self._files: list[IndexedImage] = []
        self._sizes: list[tuple[int, int]] = []
        self._memory: TrainSampler | None = None
        self._cached: list[Tensor | str] | None = None
        if isinstance(data, Dataset):
            self.names = [name for name, _ in data.train]
            self._memory = TrainSampler([img for _, img in data.train], patch_size, batch_size, seed)
            return
        self.dropped = [dict(d) for d in data.dropped]
        self._files = _usable(data, patch_size, small_images)
        self.names = [im.name for im in self._files]
        self._sizes = [(im.height, im.width) for im in self._files]
        if cache:
            self._cached = [self._load(im) for im in self._files]
            failed = [(im, x) for im, x in zip(self._files, self._cached, strict=True) if isinstance(x, str)]
            if len(failed) == len(self._files):
                raise self._none_decode(failed[0][0], failed[0][1])
            self._report([(_shown(im.path), why) for im, why in failed], None, stacklevel=2)

    @staticmethod
    def _load(image: IndexedImage) -> Tensor | str:
        """The decoded image, or why it cannot be (for ``cache=True``)."""
        try:
            return _check_indexed(image, load_image(image.path))
        except DataError as err:
            return err.reason

    def _none_decode(self, image: IndexedImage, reason: str) -> DataError:
        return DataError(f"{self.source}: none of the {len(self._files)} training images decodes any "
                         f"more (they changed after indexing; index again); first: "
                         f"{_shown(image.path)}: {reason}")

    def batch(self, step: int) -> Tensor:
        """Batch ``step`` of this rank, computed in this process: ``(batch_size, 3, P, P)`` float32.

        Raises:
            ValueError: negative ``step``.
            DataError: no training image decodes any more (see the class docstring).
        """
        out, failed = self._batch(step)
        self._report(failed, step, stacklevel=2)
        return out

    def _batch(self, step: int) -> tuple[Tensor, list[tuple[str, str]]]:
        """Batch ``step`` and the ``(file, reason)`` of each file that failed to decode in it."""
        if self._memory is not None:
            return self._memory.batch(step, self.rank, self.world_size), []
        _check_step(step, self.rank, self.world_size)
        p = self.patch_size
        failed: dict[int, str] = {}
        crops = []
        plan = _crop_plan(self._sizes, p, self.batch_size, self.seed, step, self.rank)
        for slot, (idx, top, left, flip) in enumerate(plan):
            crop = self._crop(idx, top, left, failed)
            if crop is None:
                crop, flip = self._replacement(step, slot, failed)
            crops.append(crop.flip(-1) if flip else crop)
        return torch.stack(crops), [(_shown(self._files[i].path), why) for i, why in failed.items()]

    def _crop(self, idx: int, top: int, left: int, failed: dict[int, str]) -> Tensor | None:
        """The crop of image ``idx`` at ``(top, left)``; ``None`` (its reason put in ``failed``)
        if the image does not decode or no longer has its indexed size."""
        if idx in failed:
            return None
        p = self.patch_size
        if self._cached is not None:
            image = self._cached[idx]
            if isinstance(image, str):
                failed[idx] = image
                return None
            return image[:, top : top + p, left : left + p]
        try:
            return _decode_crop(self._files[idx], top, left, p)
        except DataError as err:
            failed[idx] = err.reason
            return None

    def _replacement(self, step: int, slot: int, failed: dict[int, str]) -> tuple[Tensor, bool]:
        """``(crop, flip)`` replacing crop ``slot`` of ``step``, whose image failed (the rule of
        the class docstring).

        Raises:
            DataError: no training image decodes.
        """
        p = self.patch_size
        g = _generator(self.seed, step, self.rank, slot, _REPLACEMENT)
        for idx in torch.randperm(len(self._sizes), generator=g).tolist():
            ut, ul, uf = torch.rand(3, generator=g, dtype=torch.float64).tolist()
            h, w = self._sizes[idx]
            crop = self._crop(idx, int(ut * (h - p + 1)), int(ul * (w - p + 1)), failed)
            if crop is not None:
                return crop, uf < 0.5
        first = next(iter(failed))
        raise self._none_decode(self._files[first], failed[first])

    def _report(self, failed: list[tuple[str, str]], step: int | None, stacklevel: int) -> None:
        """Record, and warn once about, each file newly found undecodable."""
        for file, why in failed:
            if file in self._reported:
                continue
            self._reported.add(file)
            self.dropped.append({"file": file, "reason": why, "step": step})
            at = "" if step is None else f" (first drawn at step {step})"
            _warn(f"{file}: {why}{at}; its crops are replaced by crops of other training images, "
                  f"the same ones for seed {self.seed} on every run", stacklevel + 1)

    def batches(self, start_step: int = 0, stop_step: int | None = None) -> Iterator[tuple[int, Tensor]]:
        """``(step, batch(step))`` for ``step = start_step, start_step + 1, ...`` up to ``stop_step``
        (excluded; ``None``: without end), prepared ahead by ``workers`` loader processes.

        Raises:
            ValueError: negative ``start_step``.
            DataError: as :meth:`batch`, when the batch is reached (one line, from the worker).
        """
        _check_step(start_step, self.rank, self.world_size)
        steps = itertools.count(start_step) if stop_step is None else range(start_step, stop_step)
        if self.workers == 0:
            for step in steps:
                yield step, self.batch(step)
            return
        loader = torch.utils.data.DataLoader(
            _StepBatches(self), batch_size=None, sampler=steps, num_workers=self.workers,
            prefetch_factor=self.prefetch,
            # its own generator: the loader draws its workers' base seed from it, not from the
            # global RNG that training's noise draws from (workers or not, the same numbers)
            generator=torch.Generator(),
        )
        for step, out, failed in loader:
            if isinstance(out, DataError):
                raise out
            self._report([tuple(f) for f in failed], step, stacklevel=2)
            yield step, out


_REPLACEMENT = 1
"""Extra seed of the generator that replaces a crop of an undecodable file (see
:class:`TrainStream`): ``(seed, step, rank, slot, 1)`` never equals a batch's ``(seed, step, rank)``."""


class _StepBatches(torch.utils.data.Dataset):
    """Map-style view ``step -> (step, batch or the DataError it raised, failed files)`` for
    DataLoader workers.

    The error travels as a value so that it arrives as the same one-line :class:`DataError`
    rather than wrapped in the worker's traceback; the ``(file, reason)`` of files that failed to
    decode travel too, so that the main process warns about them (once each) and records them.
    """

    def __init__(self, stream: TrainStream) -> None:
        self.stream = stream

    def __getitem__(self, step: int) -> tuple[int, Tensor | DataError, list[tuple[str, str]]]:
        try:
            return (step, *self.stream._batch(step))
        except DataError as err:
            return step, err, []


# ---------------------------------------------------------------------------------------------
# Evaluation


def pad_to_multiple(x: Tensor, multiple: int = 64) -> tuple[Tensor, tuple[int, int]]:
    """Pad ``(..., H, W)`` on the bottom and right to multiples of ``multiple``.

    The padding **replicates** the last row and column (no artificial edge to spend bits on).
    Metrics must be computed on the original area: ``crop_to(y, size)``.

    Returns:
        ``(padded, (H, W))``; ``padded`` is ``x`` itself when no padding is needed.

    Raises:
        ValueError: ``multiple < 1`` or fewer than 2 dimensions.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    if x.dim() < 2:
        raise ValueError(f"pad_to_multiple expects (..., H, W), got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    flat = x.reshape(1, -1, h, w)
    padded = F.pad(flat, (0, pw, 0, ph), mode="replicate")
    return padded.reshape(*x.shape[:-2], h + ph, w + pw), (h, w)


def crop_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Undo :func:`pad_to_multiple`: the top-left ``(..., h, w)`` of ``x`` (a view).

    Raises:
        ValueError: ``size`` is larger than ``x``.
    """
    h, w = size
    if h > x.shape[-2] or w > x.shape[-1]:
        raise ValueError(f"cannot crop {_hw(x)} to {h}x{w}")
    return x[..., :h, :w]


def center_crop(x: Tensor, size: int, name: str | None = None) -> Tensor:
    """The central ``size`` x ``size`` square of ``(..., H, W)`` (a view).

    Raises:
        DataError: ``H`` or ``W`` smaller than ``size`` (the message names ``name`` if given).
    """
    h, w = x.shape[-2:]
    if h < size or w < size:
        what = f"{name}: image" if name else "image"
        raise DataError(f"{what} is {_hw(x)}, smaller than the {size}x{size} centre crop")
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


PROBE_MIN_POSITIONS = 8192
"""A probe set should give at least this many positions of ``y`` (16x downsampling: 256 pixels each)."""
PROBE_MIN_REGIONS = 8
"""... from at least this many distinct image regions."""


def probe_regions(images: list[tuple[str, Tensor]], size: int) -> list[tuple[int, int, int]]:
    """Every probe region of ``images``: ``(i, top, left)`` (``i`` indexes ``images``) of
    non-overlapping ``size`` x ``size`` squares, in the order :func:`probe_set` takes them.

    Rule (no RNG): each image at least ``size`` in both dimensions is tiled by the centred grid of
    ``H // size`` x ``W // size`` squares (row-major within the image); the images take turns, one
    square each, in the order given (image 0's first square, image 1's first, ..., image 0's
    second, ...), so a short probe set still spans many photographs. Taking turns is water-filling:
    among the first ``count`` regions no image gives more than one region beyond any other image
    that still had a square left, so an image exceeds the even share ``count / images`` only when
    smaller images have run out of squares. With non-overlapping squares nothing spreads further.
    The built-in photographs at the defaults (32 of 256 px) cannot be spread evenly: chelsea 1,
    coffee, rocket and stereo_motorcycle 2 each, astronaut and immunohistochemistry 4 each,
    retina 8, hubble_deep_field 9 (17 of 32 from the two largest); 128 regions of 128 px (the same
    8192 positions of ``y``, but 8 x 8 maps, more of them at the zero-padded border) give 24 and
    24 of 128.

    Raises:
        ValueError: ``size`` below 1.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    tiles = []
    for i, (_, img) in enumerate(images):
        h, w = img.shape[-2:]
        rows, cols = h // size, w // size
        top0, left0 = (h - rows * size) // 2, (w - cols * size) // 2
        tiles.append([(i, top0 + r * size, left0 + c * size) for r in range(rows) for c in range(cols)])
    longest = max((len(t) for t in tiles), default=0)
    return [t[j] for j in range(longest) for t in tiles if j < len(t)]


def probe_set(images: list[tuple[str, Tensor]], count: int = 32, size: int = 256) -> Tensor:
    """Fixed, non-overlapping regions of images for capturing latents: ``(n, 3, size, size)``
    float32 with ``n = min(count, regions available)`` (see :func:`probe_regions` for the rule).

    Pass the test images first, then the training images (``dataset.test + dataset.train``): the
    probe is the same fixed set of regions at every capture, never the random training crops of the
    step being captured, so training photographs are fair to use; the built-in test set alone (two
    photographs) has too few regions. The defaults, 32 regions of 256 px, give 32 x 16 x 16 = 8192
    positions of ``y`` (:data:`PROBE_MIN_POSITIONS`). The result is a new tensor.

    Raises:
        DataError: no image is at least ``size`` x ``size``.
        ValueError: ``count`` or ``size`` below 1.
    """
    if count < 1 or size < 1:
        raise ValueError(f"count and size must be >= 1, got {count}, {size}")
    regions = probe_regions(images, size)[:count]
    if not regions:
        sizes = ", ".join(f"{name} {_hw(img)}" for name, img in images) or "none"
        raise DataError(f"no image is at least {size}x{size} for the probe set ({sizes})")
    crops = [images[i][1][:, top : top + size, left : left + size] for i, top, left in regions]
    return torch.stack(crops).to(torch.float32, copy=True)


def test_batches(
    test: list[tuple[str, Tensor]], test_size: int | None, multiple: int = 64
) -> Iterator[tuple[str, Tensor, tuple[int, int]]]:
    """Yield ``(name, image (1, 3, H', W'), (h, w))`` for each test image, in order.

    With ``test_size=None`` the whole image, else its central ``test_size`` square; either way
    padded (replicate, bottom/right) so that ``H'`` and ``W'`` are multiples of ``multiple``.
    Metrics belong on the top-left ``(h, w)`` area: ``crop_to(x_hat, (h, w))``.

    Raises:
        DataError: a test image smaller than ``test_size`` (naming it), when it is reached.
    """
    for name, img in test:
        x = img if test_size is None else center_crop(img, test_size, name)
        padded, hw = pad_to_multiple(x.unsqueeze(0), multiple)
        yield name, padded, hw


test_batches.__test__ = False  # type: ignore[attr-defined]  # not a pytest test, despite its name
