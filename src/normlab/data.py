"""CIFAR-10 from the official python-pickle layout to uint8 tensors, splits, batched augmentation.

The whole data set lives as one uint8 tensor on the training device; it is normalized once per
batch on the device, and crops and flips are drawn per image but applied per batch on tensors
(no per-image PIL transforms), in the manner of airbench.
"""
from __future__ import annotations

import functools
import hashlib
import os
import pickle
import shutil
import tarfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy._core.multiarray import _reconstruct
from numpy._core.numeric import _frombuffer

from normlab import folders
from normlab.errors import DataError, no_space

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
IMAGE_SIZE = 32  # CIFAR-10 images are 32 x 32 pixels
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (125.31 / 255, 122.95 / 255, 113.87 / 255)  # training-set channel means (of 1)
STD = (0.2470, 0.2435, 0.2616)                     # training-set channel standard deviations
DEFAULT_DIR = "./data"
NEEDED_BYTES = 341_000_000  # the archive (163 MB), kept, and what it extracts to (178 MB)
REPLACE_BATCH = "replace the file or delete the folder to download it again"  # the way out of a damaged batch file


def resolve_data_dir(arg: str | os.PathLike | None) -> Path:
    """``--data-dir``, else ``$NORMLAB_DATA``, else ``./data``."""
    return Path(arg or os.environ.get("NORMLAB_DATA") or DEFAULT_DIR)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safe_extract(archive: Path, target: Path) -> None:
    """Extract a .tar.gz into ``target``, refusing any member that would land outside it."""
    target = target.resolve()
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            dest = (target / member.name).resolve()
            if not dest.is_relative_to(target) or member.issym() or member.islnk():
                raise DataError(f"archive {archive} has a member that would land outside {target}: {member.name!r}; refusing to extract it. Delete it and use the official archive")
            if not (member.isfile() or member.isdir()):
                raise DataError(f"archive {archive} has a member that is not a plain file or folder: {member.name!r}; refusing to extract it. Delete it and use the official archive")
        tar.extractall(target, filter="data")


def download(root: Path, url: str | None = None, md5: str | None = None) -> None:
    """Fetch the official archive into ``root``, check its MD5, extract it safely, keep it."""
    url, md5 = url or URL, md5 or MD5  # read at call time, so that tests can point URL elsewhere
    try:
        made = folders.make(root)  # removed again if the download fails
    except OSError as e:
        raise (no_space(e, root / FOLDER, NEEDED_BYTES) or DataError(
            f"cannot create data folder {root} ({e.strerror or e}); pass --data-dir DIR (a folder that holds {FOLDER}/ or can receive it)")) from None
    archive = root / Path(url).name
    if not archive.exists():
        partial = archive.with_suffix(archive.suffix + ".part")
        print(f"normlab: downloading CIFAR-10 (163 MB) from {url} to {root} ...", flush=True)
        try:
            with urllib.request.urlopen(url, timeout=30) as response, open(partial, "wb") as f:
                shutil.copyfileobj(response, f)
        except OSError as e:
            partial.unlink(missing_ok=True)
            folders.remove_empty(made)
            if (full := no_space(e, partial, NEEDED_BYTES)) is not None:
                raise full from None
            raise DataError(
                f"CIFAR-10 not found in {root / FOLDER} and the download from {url} failed ({e}); "
                "point normlab at a folder that holds cifar-10-batches-py/ with --data-dir DIR or NORMLAB_DATA=DIR"
            ) from None
        got = _md5(partial)
        if got != md5:
            partial.unlink(missing_ok=True)
            folders.remove_empty(made)
            raise DataError(f"downloaded archive from {url} has MD5 {got}, expected {md5}; the partial file was removed, try again")
        partial.rename(archive)
    elif _md5(archive) != md5:
        raise DataError(f"archive {archive} has the wrong MD5 (expected {md5}); delete it and run again to download it afresh")
    had_folder = (root / FOLDER).exists()
    try:
        safe_extract(archive, root)
    except OSError as e:
        if not had_folder:  # half a data set would later read as damaged batches
            shutil.rmtree(root / FOLDER, ignore_errors=True)
        raise (no_space(e, root / FOLDER, NEEDED_BYTES) or e) from None


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as Python 3 pickles of protocol 2 or lower use it (to write bytes), and only so."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r:.40}")
    return text.encode("latin1")


# The only globals a CIFAR-10 batch needs: a dict of str, bytes, ints, lists and uint8 arrays, pickled by
# Python 2 and numpy 1 (the official archive: numpy.core), by numpy 2 (numpy._core), with protocol 5
# (_frombuffer), or by Python 3 with protocol 2 or lower (bytes as _codecs.encode(text, "latin1")).
SAFE_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _latin1_bytes,
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch, refusing every global outside ``SAFE_GLOBALS``.

    A pickle can call any importable function (``os.system``, ``builtins.eval``...) while it is
    loaded, and data files are things users are handed: loading one must never run code. Every
    global a pickle uses passes through ``find_class`` before it can be called, so refusing here
    stops a crafted file before any of its code runs. Only globals are looked up in Python; the
    rest is the C unpickler, as fast as ``pickle.load``.
    """

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")  # Python 2's byte strings (the official archive) as text
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in SAFE_GLOBALS:
            return SAFE_GLOBALS[module, name]
        shown = ascii(f"{module}.{name}")[1:-1][:200]  # one line, whatever the file holds
        raise DataError(
            f"CIFAR-10 batch {self.path} holds a pickle that would call {shown}, which the CIFAR-10 format never does; "
            "normlab refuses to load it (files you were handed can run code when unpickled). "
            "Replace the file with an official copy or delete the folder to download it again"
        )


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = _BatchUnpickler(f, path).load()
        data, labels = np.asarray(d["data"]), np.asarray(d["labels"])
    except FileNotFoundError:
        raise DataError(f"CIFAR-10 batch {path} is missing; copy the complete cifar-10-batches-py/ folder again") from None
    except DataError:
        raise
    except Exception as e:  # truncated pickles raise EOFError, UnpicklingError, ValueError, KeyError...
        detail = " ".join(f"{type(e).__name__}: {e}".split())[:300]  # one line, whatever the file holds
        raise DataError(f"CIFAR-10 batch {path} is truncated or corrupt ({detail}); {REPLACE_BATCH}") from None
    for key, array in (("data", data), ("labels", labels)):
        if array.dtype == object:
            raise DataError(f"CIFAR-10 batch {path} holds Python objects as its {key} (an array of dtype object), where the CIFAR-10 format has plain numbers; {REPLACE_BATCH}")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"CIFAR-10 batch {path} holds data of shape {data.shape} and type {data.dtype}; expected (N, 3072) uint8; {REPLACE_BATCH}")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"CIFAR-10 batch {path} has {len(data)} images but {labels.size} labels of type {labels.dtype} (expected whole numbers 0-9); {REPLACE_BATCH}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise DataError(f"CIFAR-10 batch {path} has labels outside 0-9 (min {labels.min()}, max {labels.max()}); {REPLACE_BATCH}")
    return data, labels.astype(np.int64)


def _check_folder(root: Path) -> None:
    """A data folder given as a file, or as a loop of symbolic links, is named as such (not "cannot create ... exists")."""
    if root.is_dir():
        return
    if root.exists():
        what = "is a file, not a folder"
    elif (why := folders.why_missing(root)) != folders.MISSING:
        what = f"cannot be opened: {why}"
    else:
        return  # absent: CIFAR-10 is downloaded into it
    raise DataError(f"the data folder {root} {what}; pass --data-dir DIR, a folder that holds {FOLDER}/ (or none yet, to download CIFAR-10 into)")


def load_split(root: str | os.PathLike, train: bool, allow_download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of the training or test split."""
    root = Path(root)
    folder = root / FOLDER
    _check_folder(root)
    if not folder.is_dir():
        if not allow_download:
            raise DataError(f"no CIFAR-10 in {folder}; pass --data-dir DIR (a folder that holds {FOLDER}/) or set NORMLAB_DATA=DIR")
        download(root)
    parts = [_read_batch(folder / name) for name in (TRAIN_FILES if train else TEST_FILES)]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if len(data) == 0:
        raise DataError(f"CIFAR-10 {'training' if train else 'test'} split in {folder} is empty; copy the complete {FOLDER}/ folder again")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels)


def fingerprint(images: torch.Tensor, labels: torch.Tensor) -> dict:
    """What identifies a split: its size, a hash of its labels and a hash of every 97th image.

    Recorded in a run folder, so that a resumed run refuses other data than it started on."""
    sample = images[::97].contiguous().numpy().tobytes()
    return {"images": len(labels), "labels_sha256": hashlib.sha256(labels.numpy().astype("<i8").tobytes()).hexdigest(),
            "pixels_sha256": hashlib.sha256(sample).hexdigest()}


def stratified_split(labels: torch.Tensor, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val) with ``val_size`` images held out in equal shares per class."""
    n = len(labels)
    if val_size == 0:
        return torch.arange(n), torch.arange(0)
    if val_size >= n:
        raise DataError(f"--val-size {val_size} leaves no training images (the split has {n}); choose fewer")
    g = torch.Generator().manual_seed(10_000 + seed)
    order = torch.randperm(n, generator=g)
    # Rank each image within its class in the shuffled order; take the lowest ranks per class.
    shuffled = labels[order]
    counts = torch.bincount(shuffled, minlength=len(CLASSES)).double()
    quota = torch.floor(counts * val_size / n)
    short = val_size - int(quota.sum())  # hand the remainder out, one per class, largest first
    quota[torch.argsort(counts - quota, descending=True)[:short]] += 1
    rank = torch.zeros(n, dtype=torch.long)
    for c in range(len(CLASSES)):
        idx = (shuffled == c).nonzero().squeeze(1)
        rank[idx] = torch.arange(len(idx))
    is_val = rank < quota[shuffled].long()
    return order[~is_val].sort().values, order[is_val].sort().values


@functools.lru_cache(maxsize=None)
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The channel mean and std (of 255) on ``device``, made once: a copy per batch would sync a GPU."""
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255
    return mean, std


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor (random draws) to the training device without blocking the host: through
    pinned memory, asynchronously, on CUDA; unchanged on a CPU."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def normalize(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 (B, 3, 32, 32) -> float (B, 3, 32, 32) with training-set mean 0 and std 1 per channel."""
    mean, std = _mean_std(images.device)
    x = (images.float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def draw_epoch(n: int, batch_size: int, pad: int, random_flips: bool, generator: torch.Generator,
               cutout: int = 0) -> torch.Tensor:
    """One epoch's random draws on the CPU generator, as one (k, n) int64 tensor: the shuffled order, then
    each image's crop offsets (rows dy, dx; with ``pad``), flip (0/1; with ``random_flips``) and cutout
    square's top-left corner (rows y, x in [0, 32 - cutout]; with ``cutout``).

    They are drawn batch by batch, in the order a draw per step would take them, so the stream (and
    every result) is the one of a per-step draw; made at once, they reach a GPU in one copy an epoch,
    not two or three small copies a step, and the step draws nothing. With ``cutout`` 0 the stream is
    the one drawn before cutout existed."""
    rows = [torch.randperm(n, generator=generator)]
    dy, dx, flips, cy, cx = [], [], [], [], []
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        if pad:
            dy.append(torch.randint(0, 2 * pad + 1, (b,), generator=generator))
            dx.append(torch.randint(0, 2 * pad + 1, (b,), generator=generator))
        if random_flips:
            flips.append((torch.rand(b, generator=generator) < 0.5).long())
        if cutout:
            cy.append(torch.randint(0, IMAGE_SIZE - cutout + 1, (b,), generator=generator))
            cx.append(torch.randint(0, IMAGE_SIZE - cutout + 1, (b,), generator=generator))
    rows += [torch.cat(r) for r in (dy, dx, flips, cy, cx) if r]
    return torch.stack(rows)


def cut_out(x: torch.Tensor, size: int, corners: torch.Tensor) -> torch.Tensor:
    """Cutout (DeVries and Taylor, 2017; airbench96's ``batch_cutout``): a ``size`` x ``size`` square of each
    normalized image set to 0, the training mean; ``corners`` (2, B): each square's top row and left column,
    the square wholly inside the image. One mask for the batch, no loop over images."""
    b, _, h, w = x.shape
    y0, x0 = corners
    r = torch.arange(h, device=x.device)
    c = torch.arange(w, device=x.device)
    inside_r = (r >= y0[:, None]) & (r < y0[:, None] + size)  # (B, H)
    inside_c = (c >= x0[:, None]) & (c < x0[:, None] + size)  # (B, W)
    return x.masked_fill((inside_r[:, :, None] & inside_c[:, None, :])[:, None], 0.0)  # mask (B, 1, H, W)


CROP_FILLS = ("zero", "reflect")  # what a random crop sees beyond the image's edge (Config.crop_fill)


def augment(images: torch.Tensor, pad: int, offsets: torch.Tensor | None, flips: torch.Tensor | None,
            fill: str = "zero") -> torch.Tensor:
    """Random crop (padding ``pad``; ``offsets`` (2, B): each image's row and column offset in
    [0, 2 * pad]) and horizontal flip (``flips``: which images, bool (B,)), applied to the batch at once.

    ``fill``: what lies beyond the image's edge, "zero" (black pixels; the padding of ``F.pad``) or "reflect"
    (the image mirrored at its edge, the edge not repeated: ``F.pad(..., mode="reflect")``, airbench's crops).
    One gather of every output pixel from the batch (zero-padded first for "zero"; for "reflect" each index
    outside the image is mirrored back into it), the flip folded into the column index (column j of a flipped
    crop is column w - 1 - j of the crop): the same pixels as padding, cropping and then flipping, in one pass
    (a 128-image batch on a 2-core CPU: 1.7 ms against 8.7 ms for advanced indexing, a flip of the whole batch
    and a select)."""
    if fill not in CROP_FILLS:
        raise ValueError(f"unknown crop fill {fill!r}; choose one of: {', '.join(CROP_FILLS)}")
    if not pad and flips is None:
        return images
    b, c, h, w = images.shape
    if fill == "reflect" and pad >= min(h, w):
        raise ValueError(f"reflect padding needs a pad below the image's side ({min(h, w)}), got {pad}")
    zero_fill = pad and fill == "zero"
    src = torch.nn.functional.pad(images, (pad, pad, pad, pad)) if zero_fill else images  # (B, C, H+2p, W+2p) if zero_fill
    rows = torch.arange(h, device=images.device).expand(b, h)  # (B, H)
    cols = torch.arange(w, device=images.device).expand(b, w)  # (B, W)
    if flips is not None:
        cols = torch.where(flips[:, None], w - 1 - cols, cols)
    if pad:
        dy, dx = offsets
        rows, cols = rows + dy[:, None], cols + dx[:, None]  # in the padded image
        if not zero_fill:  # back into the image, mirrored at its edges: -1 -> 1, h -> h - 2
            rows = (h - 1) - ((h - 1) - (rows - pad).abs()).abs()
            cols = (w - 1) - ((w - 1) - (cols - pad).abs()).abs()
    width = w + 2 * pad if zero_fill else w
    index = (rows[:, :, None] * width + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return src.flatten(2).gather(2, index).view(b, c, h, w)


@dataclass
class Batches:
    """Shuffled, augmented training batches (or plain ordered batches when ``train`` is False)."""

    images: torch.Tensor  # (N, 3, 32, 32) uint8, on the training device
    labels: torch.Tensor  # (N,) int64, on the training device
    batch_size: int
    train: bool = True
    pad: int = 4
    flip: bool = True
    channels_last: bool = True
    generator: torch.Generator | None = None
    alternate: bool = False  # alternating flips: each image is flipped in every other epoch (random in the first)
    epoch: int = 0           # epochs begun so far: the parity of the alternating flips
    cutout: int = 0          # side (px) of the square cut out of each training image after normalizing; 0 = off
    fill: str = "zero"       # beyond the edge of a random crop: "zero" (black) or "reflect" (mirrored), CROP_FILLS

    def __post_init__(self) -> None:
        self.first_flips = None  # each image's flip in the first epoch, drawn once (alternating flips only)
        if self.train and self.flip and self.alternate:
            self.first_flips = to_device(torch.rand(len(self.labels), generator=self.generator) < 0.5, self.images.device)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        if not self.train:
            for i in range(0, n, self.batch_size):
                yield normalize(self.images[i : i + self.batch_size], self.channels_last), self.labels[i : i + self.batch_size]
            return
        random_flips = self.flip and self.first_flips is None
        draws = to_device(draw_epoch(n, self.batch_size, self.pad, random_flips, self.generator, self.cutout),
                          self.images.device)
        order, offsets = draws[0], draws[1:3] if self.pad else None
        flip_row = 3 if self.pad else 1
        corners = draws[-2:] if self.cutout else None
        odd = self.epoch % 2 == 1
        self.epoch += 1
        for i in range(0, n, self.batch_size):
            idx = order[i : i + self.batch_size]
            if not self.flip:
                flips = None
            elif random_flips:
                flips = draws[flip_row, i : i + self.batch_size].bool()
            else:
                flips = self.first_flips[idx] ^ odd
            x = augment(self.images[idx], self.pad, None if offsets is None else offsets[:, i : i + self.batch_size], flips,
                        self.fill)
            x = normalize(x, self.channels_last)
            if corners is not None:
                x = cut_out(x, self.cutout, corners[:, i : i + self.batch_size])
            yield x, self.labels[idx]
