"""Data: the official on-disk layout, checked downloads, safe extraction, splits, batched augmentation."""
import hashlib
import io
import os
import pickle
import shlex
import struct
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from normlab import data as D
from normlab.config import Config, ConfigError
from normlab.data import FOLDER, DataError, augment, load_split, stratified_split
from conftest import make_cifar, one_error_line


# ---------------------------------------------------------------- loading the official layout
def test_loader_reads_official_layout(cifar_dir):
    images, labels = load_split(cifar_dir, train=True)
    assert images.shape == (200, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (200,) and labels.dtype == torch.int64
    assert labels.min() >= 0 and labels.max() <= 9 and torch.bincount(labels).tolist() == [20] * 10
    # The 3072 bytes of a row are the red, green and blue planes of 32 x 32, in this order.
    with open(cifar_dir / FOLDER / "data_batch_1", "rb") as f:
        d = pickle.load(f, encoding="latin1")
    assert torch.equal(images[0], torch.from_numpy(d["data"][0].reshape(3, 32, 32)))
    assert labels[:40].tolist() == d["labels"]
    test_images, test_labels = load_split(cifar_dir, train=False)
    assert test_images.shape == (50, 3, 32, 32) and test_labels.shape == (50,)


def _rewrite(path: Path, change) -> None:
    """Replace entries of a pickled batch with ``change(batch)``, a dict; sizes follow the batch's own."""
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="latin1")
    d.update(change(d))
    with open(path, "wb") as f:
        pickle.dump(d, f)


BAD_BATCHES = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "garbage": lambda p: p.write_bytes(b"this is not a pickle\n" * 10),
    "empty file": lambda p: p.write_bytes(b""),
    "not a dict": lambda p: p.write_bytes(pickle.dumps([1, 2, 3])),
    "missing": lambda p: p.unlink(),
    "wrong shape": lambda p: _rewrite(p, lambda d: {"data": np.zeros((len(d["labels"]), 100), np.uint8)}),
    "wrong dtype": lambda p: _rewrite(p, lambda d: {"data": d["data"].astype(np.float32)}),
    "labels out of range": lambda p: _rewrite(p, lambda d: {"labels": [10] * len(d["labels"])}),
    "negative labels": lambda p: _rewrite(p, lambda d: {"labels": [-1] * len(d["labels"])}),
    "label count": lambda p: _rewrite(p, lambda d: {"labels": d["labels"][:-1]}),
    "text labels": lambda p: _rewrite(p, lambda d: {"labels": ["cat"] * len(d["labels"])}),
    "object data": lambda p: _rewrite(p, lambda d: {"data": d["data"].astype(object)}),
    "object labels": lambda p: _rewrite(p, lambda d: {"labels": np.array(d["labels"], dtype=object)}),
}


@pytest.mark.parametrize("damage", list(BAD_BATCHES))
def test_bad_batch_is_rejected_naming_the_file(cifar_dir, damage):
    path = cifar_dir / FOLDER / "data_batch_3"
    BAD_BATCHES[damage](path)
    with pytest.raises(DataError) as e:
        load_split(cifar_dir, train=True)
    message = str(e.value)
    assert str(path) in message and "\n" not in message
    assert any(w in message for w in ("replace", "copy", "delete")), message  # says what to do


def test_object_arrays_are_refused_in_one_line(cifar_dir):
    for key in ("data", "labels"):
        path = cifar_dir / FOLDER / "data_batch_3"
        _rewrite(path, lambda d: {key: np.asarray(d[key]).astype(object)})
        with pytest.raises(DataError) as e:
            load_split(cifar_dir, train=True)
        assert str(path) in str(e.value) and f"Python objects as its {key} (an array of dtype object)" in str(e.value)
        assert "\n" not in str(e.value)
        _rewrite(path, lambda d: {key: np.asarray(d[key]).astype(np.uint8 if key == "data" else np.int64)})
    assert load_split(cifar_dir, train=True)[0].shape == (200, 3, 32, 32)  # the repaired file loads again


# ---------------------------------------------------------------- files that would run code when unpickled
class Call:
    """Pickles as the call ``func(*args)``: what a crafted file uses to run code while it is loaded."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _good_batch(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


CRAFTED = {  # name -> (write the crafted file: (path, marker) -> None, the global its message names)
    "os.system": (lambda p, m: p.write_bytes(pickle.dumps(Call(os.system, f"touch {shlex.quote(str(m))}"))), "system"),
    "os.system in labels": (lambda p, m: p.write_bytes(pickle.dumps({**_good_batch(p), "labels": Call(os.system, f"touch {shlex.quote(str(m))}")})), "system"),
    "builtins.eval in data": (lambda p, m: p.write_bytes(pickle.dumps({**_good_batch(p), "data": Call(eval, f"open({str(m)!r}, 'w')")})), "builtins.eval"),
    "subprocess.Popen in filenames": (lambda p, m: p.write_bytes(pickle.dumps({**_good_batch(p), "filenames": [Call(subprocess.Popen, ["touch", str(m)])]})), "subprocess.Popen"),
    "GLOBAL opcode, protocol 0": (lambda p, m: p.write_bytes(b"cos\nsystem\n(V" + f"touch {shlex.quote(str(m))}".encode() + b"\ntR."), "os.system"),
    "INST opcode, protocol 0": (lambda p, m: p.write_bytes(b"(V" + f"touch {shlex.quote(str(m))}".encode() + b"\nios\nsystem\n."), "os.system"),
    "a name with a newline": (lambda p, m: p.write_bytes(b"\x80\x04\x8c\x02os\x8c\x07sys\ntem\x93."), "os.sys\\ntem"),
}


@pytest.mark.parametrize("craft", list(CRAFTED))
def test_pickle_that_would_run_code_is_refused(cifar_dir, tmp_path, craft):
    path, marker = cifar_dir / FOLDER / "data_batch_3", tmp_path / "MARKER"
    write, refused = CRAFTED[craft]
    write(path, marker)
    with pytest.raises(DataError) as e:
        load_split(cifar_dir, train=True)
    message = str(e.value)
    assert f"CIFAR-10 batch {path} holds a pickle that would call " in message and refused in message, message
    assert "\n" not in message and "delete the folder" in message
    assert not marker.exists()


@pytest.mark.parametrize("craft", ["os.system", "os.system in labels", "subprocess.Popen in filenames"])
def test_pickle_that_would_run_code_is_refused_by_the_cli(tmp_path, capsys, craft):
    from normlab.cli import main

    data, out, marker = make_cifar(tmp_path / "data", per_batch=10, test=10), tmp_path / "run", tmp_path / "MARKER"
    path = data / FOLDER / "data_batch_3"
    CRAFTED[craft][0](path, marker)
    rc = main(["train", "--data-dir", str(data), "--epochs", "1", "--threads", "1", "--out", str(out)])
    err = one_error_line(capsys)
    assert rc == 2
    assert str(path) in err and "would call" in err
    assert not marker.exists()


class Py2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle wrote the official batches: protocol 2, every str and bytes a byte
    string, numpy's globals under numpy.core."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_byte_string(self, obj):
        b = obj.encode("latin1") if isinstance(obj, str) else obj
        self.write(pickle.SHORT_BINSTRING + bytes([len(b)]) + b if len(b) < 256 else pickle.BINSTRING + struct.pack("<i", len(b)) + b)
        self.memoize(obj)

    def save_global(self, obj, name=None):
        self.write(pickle.GLOBAL + f"{obj.__module__.replace('numpy._core', 'numpy.core')}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch[str] = dispatch[bytes] = save_byte_string
    dispatch[type] = save_global


@pytest.mark.parametrize("writer", ["python 2", *(f"protocol {n}" for n in range(pickle.HIGHEST_PROTOCOL + 1))])
def test_batches_pickled_every_way_still_load(cifar_dir, writer):
    """The official archive (Python 2, numpy.core), numpy 2 with any protocol (_frombuffer in 5, bytes
    through _codecs.encode up to 2): all load, to the same arrays."""
    expected = load_split(cifar_dir, train=True)
    for name in D.TRAIN_FILES:
        path = cifar_dir / FOLDER / name
        d = _good_batch(path)
        with open(path, "wb") as f:
            Py2Pickler(f, 2).dump(d) if writer == "python 2" else pickle.dump(d, f, protocol=int(writer.split()[1]))
    images, labels = load_split(cifar_dir, train=True)
    assert torch.equal(images, expected[0]) and torch.equal(labels, expected[1])


def test_missing_folder_without_download(tmp_path):
    with pytest.raises(DataError, match="--data-dir"):
        load_split(tmp_path / "nowhere", train=True, allow_download=False)


def test_missing_folder_unreachable_download(tmp_path):
    # conftest points normlab.data.URL at a closed local port: no test ever reaches the internet.
    root = tmp_path / "typo" / "data"
    with pytest.raises(DataError, match="download .* failed.*--data-dir"):
        load_split(root, train=True)
    assert list(tmp_path.iterdir()) == []  # no partial file, and no folder it made, left behind
    (tmp_path / "mine").mkdir()
    with pytest.raises(DataError, match="download .* failed"):
        load_split(tmp_path / "mine", train=True)
    assert list((tmp_path / "mine").iterdir()) == []  # a folder that was there stays


# ---------------------------------------------------------------- downloads and archives
def _tar_gz(path: Path, members: dict[str, bytes]) -> str:
    """Write a .tar.gz with ``members`` (name -> content); returns its MD5."""
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def archive(tmp_path) -> tuple[str, str]:
    """A small CIFAR-10 look-alike packed like the official archive; (file:// URL, MD5)."""
    src = make_cifar(tmp_path / "src", per_batch=10, test=10)
    members = {f"{FOLDER}/{p.name}": p.read_bytes() for p in sorted((src / FOLDER).iterdir())}
    path = tmp_path / "srv" / "cifar-10-python.tar.gz"
    path.parent.mkdir()
    return path.as_uri(), _tar_gz(path, members)


def test_download_checks_md5_and_extracts(tmp_path, archive):
    url, md5 = archive
    root = tmp_path / "data"
    D.download(root, url=url, md5=md5)
    assert (root / "cifar-10-python.tar.gz").is_file()  # kept, so that a later run need not fetch it
    assert not list(root.glob("*.part"))
    images, labels = load_split(root, train=True, allow_download=False)
    assert images.shape == (50, 3, 32, 32)


def test_download_through_load_split(tmp_path, archive, monkeypatch):
    url, md5 = archive
    monkeypatch.setattr(D, "URL", url)
    monkeypatch.setattr(D, "MD5", md5)
    images, _ = load_split(tmp_path / "data", train=False)
    assert images.shape == (10, 3, 32, 32)


def test_fetch_once_downloads_before_new_models_only(tmp_path, archive, monkeypatch):
    from normlab.plan import NEW, RESUME, Job, fetch_once

    url, md5 = archive
    monkeypatch.setattr(D, "URL", url)
    monkeypatch.setattr(D, "MD5", md5)
    root = tmp_path / "data"
    monkeypatch.setenv("NORMLAB_DATA", str(root))
    fetch_once([Job(Config(), tmp_path / "m", RESUME)], None)  # a resumed model reads the data it started on
    assert not root.exists()
    fetch_once([Job(Config(), tmp_path / "m", RESUME), Job(Config(), tmp_path / "n", NEW)], None)
    assert load_split(root, train=True, allow_download=False)[0].shape == (50, 3, 32, 32)
    monkeypatch.setattr(D, "URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    fetch_once([Job(Config(), tmp_path / "n", NEW)], root)  # already there: nothing fetched


def test_checksum_mismatch_is_rejected(tmp_path, archive):
    url, md5 = archive
    root = tmp_path / "data"
    with pytest.raises(DataError, match="MD5") as e:
        D.download(root, url=url, md5="0" * 32)
    assert "removed" in str(e.value)
    assert not root.exists()  # neither the partial file nor anything extracted, nor the folder it made


def test_kept_archive_with_wrong_checksum_is_rejected(tmp_path, archive):
    url, md5 = archive
    root = tmp_path / "data"
    D.download(root, url=url, md5=md5)
    kept = root / "cifar-10-python.tar.gz"
    kept.write_bytes(kept.read_bytes()[:-10])
    with pytest.raises(DataError, match="delete it"):
        D.download(root, url=url, md5=md5)


@pytest.mark.parametrize("name", ["../evil", f"{FOLDER}/../../evil", "/tmp/normlab-evil-absolute"])
def test_member_outside_target_is_refused(tmp_path, name):
    root = tmp_path / "deep" / "data"
    root.mkdir(parents=True)
    path = tmp_path / "srv" / "cifar-10-python.tar.gz"
    path.parent.mkdir()
    md5 = _tar_gz(path, {f"{FOLDER}/data_batch_1": b"fine", name: b"evil"})
    with pytest.raises(DataError, match="outside"):
        D.download(root, url=path.as_uri(), md5=md5)
    assert not (tmp_path / "deep" / "evil").exists() and not (tmp_path / "evil").exists()
    assert not Path("/tmp/normlab-evil-absolute").exists()
    assert not (root / FOLDER).exists()  # nothing extracted: all members are checked first


def test_symlink_member_is_refused(tmp_path):
    path = tmp_path / "a.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(f"{FOLDER}/link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(DataError, match="outside"):
        D.safe_extract(path, tmp_path / "data")


# ---------------------------------------------------------------- splits
def test_stratified_split_equal_per_class_and_disjoint():
    labels = torch.arange(1000) % 10
    train, val = stratified_split(labels, 200, seed=0)
    assert len(val) == 200 and len(train) == 800
    assert torch.bincount(labels[val], minlength=10).tolist() == [20] * 10
    assert torch.bincount(labels[train], minlength=10).tolist() == [80] * 10
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(1000))
    again_train, again_val = stratified_split(labels, 200, seed=0)
    assert torch.equal(val, again_val) and torch.equal(train, again_train)
    assert not torch.equal(val, stratified_split(labels, 200, seed=1)[1])


def test_stratified_split_remainder_spread():
    labels = torch.arange(1000) % 10
    _, val = stratified_split(labels, 15, seed=3)
    counts = torch.bincount(labels[val], minlength=10)
    assert counts.sum() == 15 and counts.max() - counts.min() <= 1


def test_stratified_split_limits():
    labels = torch.arange(100) % 10
    train, val = stratified_split(labels, 0, seed=0)
    assert len(train) == 100 and len(val) == 0
    with pytest.raises(DataError, match="--val-size"):
        stratified_split(labels, 100, seed=0)


# ---------------------------------------------------------------- augmentation
def _candidates(image: torch.Tensor, pad: int) -> list[torch.Tensor]:
    padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
    crops = [padded[:, y : y + 32, x : x + 32] for y in range(2 * pad + 1) for x in range(2 * pad + 1)]
    return crops + [c.flip(2) for c in crops]


def test_augment_keeps_shape_and_draws_per_image():
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    batch = image.expand(64, 3, 32, 32).contiguous()  # one image 64 times
    draws = D.draw_epoch(64, 64, 4, True, torch.Generator().manual_seed(0))
    out = augment(batch, 4, draws[1:3], draws[3].bool())
    assert out.shape == batch.shape and out.dtype == torch.uint8
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) > 20  # crops and flips differ within one batch
    candidates = _candidates(image, 4)
    assert all(any(torch.equal(o, c) for c in candidates) for o in out)  # each is a crop, maybe flipped
    flipped = sum(any(torch.equal(o, c) for c in candidates[81:]) and not any(torch.equal(o, c) for c in candidates[:81]) for o in out)
    assert 10 < flipped < 54  # about half flipped


@pytest.mark.parametrize("pad, with_flips", [(2, True), (4, True), (2, False), (0, True)])
def test_augment_is_each_image_cropped_at_its_offsets_then_flipped(pad, with_flips):
    batch = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    draws = D.draw_epoch(32, 32, pad, with_flips, torch.Generator().manual_seed(3))
    offsets = draws[1:3] if pad else None
    flips = draws[-1].bool() if with_flips else None
    out = augment(batch, pad, offsets, flips)
    for i, image in enumerate(batch):
        y, x = (int(offsets[0, i]), int(offsets[1, i])) if pad else (0, 0)
        crop = torch.nn.functional.pad(image, (pad, pad, pad, pad))[:, y : y + 32, x : x + 32]
        assert torch.equal(out[i], crop.flip(2) if with_flips and flips[i] else crop), i


@pytest.mark.parametrize("pad, with_flips", [(2, True), (4, False), (1, True), (0, True)])
def test_reflect_fill_crops_the_mirrored_image(pad, with_flips):
    batch = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    draws = D.draw_epoch(32, 32, pad, with_flips, torch.Generator().manual_seed(5))
    offsets = draws[1:3] if pad else None
    flips = draws[-1].bool() if with_flips else None
    out = augment(batch, pad, offsets, flips, "reflect")
    assert out.dtype == torch.uint8
    padded = torch.nn.functional.pad(batch.float(), (pad, pad, pad, pad), mode="reflect") if pad else batch.float()
    for i in range(len(batch)):
        y, x = (int(offsets[0, i]), int(offsets[1, i])) if pad else (0, 0)
        crop = padded[i, :, y : y + 32, x : x + 32]
        assert torch.equal(out[i].float(), crop.flip(2) if with_flips and flips[i] else crop), i
    if pad:  # the fills differ only beyond the edge: some crop reaches past it
        assert not torch.equal(out, augment(batch, pad, offsets, flips, "zero"))


def test_reflect_fill_never_shows_black_borders():
    batch = torch.full((64, 3, 32, 32), 200, dtype=torch.uint8)
    draws = D.draw_epoch(64, 64, 4, True, torch.Generator().manual_seed(0))
    assert (augment(batch, 4, draws[1:3], draws[3].bool(), "reflect") == 200).all()
    assert (augment(batch, 4, draws[1:3], draws[3].bool(), "zero") == 0).any()


def test_augment_refuses_an_unknown_fill_and_a_pad_too_wide_to_mirror():
    batch = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    offsets = torch.zeros(2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown crop fill 'wrap'"):
        augment(batch, 2, offsets, None, "wrap")
    with pytest.raises(ValueError, match="pad below the image's side"):
        augment(batch, 32, offsets, None, "reflect")


def test_augment_same_seed_same_result():
    batch = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)

    def aug(seed):
        draws = D.draw_epoch(16, 16, 4, True, torch.Generator().manual_seed(seed))
        return augment(batch, 4, draws[1:3], draws[3].bool())

    assert torch.equal(aug(7), aug(7)) and not torch.equal(aug(7), aug(8))


def test_augment_off_is_identity():
    batch = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(augment(batch, 0, None, None), batch)


@pytest.mark.parametrize("pad, random_flips", [(2, True), (4, False), (0, True), (0, False)])
def test_epoch_draws_are_the_per_step_stream(pad, random_flips):
    """Drawn at once, an epoch's draws are those a draw per step would give, in the same order (so results
    do not depend on it), and leave the generator where per-step draws would."""
    n, bs = 50, 16
    g = torch.Generator().manual_seed(3)
    ref = [torch.randperm(n, generator=g)]
    dy, dx, fl = [], [], []
    for i in range(0, n, bs):
        b = min(bs, n - i)
        if pad:
            dy.append(torch.randint(0, 2 * pad + 1, (b,), generator=g))
            dx.append(torch.randint(0, 2 * pad + 1, (b,), generator=g))
        if random_flips:
            fl.append(torch.rand(b, generator=g) < 0.5)
    ref += [torch.cat(r).long() for r in (dy, dx, fl) if r]
    g2 = torch.Generator().manual_seed(3)
    draws = D.draw_epoch(n, bs, pad, random_flips, g2)
    assert draws.shape == (1 + 2 * bool(pad) + random_flips, n) and draws.dtype == torch.int64
    assert all(torch.equal(a, b) for a, b in zip(draws, ref, strict=True))
    assert torch.equal(g.get_state(), g2.get_state())
    if pad:
        assert 0 <= int(draws[1:3].min()) and int(draws[1:3].max()) <= 2 * pad and len(draws[1:3].unique()) > 1


@pytest.mark.parametrize("fill", ["zero", "reflect"])
def test_batches_crop_and_flip_as_drawn(fill):
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    batches = D.Batches(images, torch.arange(40), 16, True, 2, True, False, torch.Generator().manual_seed(1), fill=fill)
    draws = D.draw_epoch(40, 16, 2, True, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(images.float(), (2, 2, 2, 2), mode="constant" if fill == "zero" else "reflect").to(torch.uint8)
    got = torch.cat([x for x, _ in batches])
    for k, j in enumerate(draws[0].tolist()):
        dy, dx, flip = draws[1:, k].tolist()
        want = padded[j, :, dy : dy + 32, dx : dx + 32]
        assert torch.equal(got[k], D.normalize((want.flip(2) if flip else want)[None], False)[0])


def test_cutout_draws_follow_the_crop_and_flip_stream():
    """With cutout the epoch's draws gain two rows (each square's corner, the square inside the image), drawn
    per batch after the crops and flips; without it the stream is the one drawn before cutout existed."""
    n, bs, size = 50, 16, 8
    g = torch.Generator().manual_seed(3)
    ref = [torch.randperm(n, generator=g)]
    dy, dx, fl, cy, cx = [], [], [], [], []
    for i in range(0, n, bs):
        b = min(bs, n - i)
        dy.append(torch.randint(0, 5, (b,), generator=g))
        dx.append(torch.randint(0, 5, (b,), generator=g))
        fl.append(torch.rand(b, generator=g) < 0.5)
        cy.append(torch.randint(0, 32 - size + 1, (b,), generator=g))
        cx.append(torch.randint(0, 32 - size + 1, (b,), generator=g))
    ref += [torch.cat(r).long() for r in (dy, dx, fl, cy, cx)]
    draws = D.draw_epoch(n, bs, 2, True, torch.Generator().manual_seed(3), size)
    assert draws.shape == (6, n) and all(torch.equal(a, b) for a, b in zip(draws, ref, strict=True))
    assert int(draws[4:].min()) >= 0 and int(draws[4:].max()) <= 32 - size and len(draws[4:].unique()) > 1
    assert torch.equal(D.draw_epoch(n, bs, 2, True, torch.Generator().manual_seed(3), 0),
                       D.draw_epoch(n, bs, 2, True, torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("pad, flip", [(2, True), (0, True), (2, False), (0, False)])
def test_batches_cut_out_a_square_at_the_drawn_corner(pad, flip):
    """Each training image: cropped and flipped as drawn, normalized, then its size x size square at the drawn
    corner set to 0 (the mean) in every channel, and nothing else changed."""
    size = 6
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    batches = D.Batches(images, torch.arange(40), 16, True, pad, flip, False, torch.Generator().manual_seed(1), cutout=size)
    draws = D.draw_epoch(40, 16, pad, flip, torch.Generator().manual_seed(1), size)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    got = torch.cat([x for x, _ in batches])
    for k, j in enumerate(draws[0].tolist()):
        dy, dx = draws[1:3, k].tolist() if pad else (0, 0)
        want = padded[j, :, dy : dy + 32, dx : dx + 32]
        want = D.normalize((want.flip(2) if flip and draws[-3, k] else want)[None], False)[0].clone()
        y, x = draws[-2:, k].tolist()
        want[:, y : y + size, x : x + size] = 0
        assert torch.equal(got[k], want), k
    assert int((got == 0).all(1).sum()) >= 40 * size * size  # every image lost its square


def test_batches_cover_each_image_once():
    images = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1).expand(50, 3, 32, 32).contiguous()
    labels = torch.arange(50) % 10
    batches = D.Batches(images, labels, 16, True, 0, False, False, torch.Generator().manual_seed(0))
    assert len(batches) == 4
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == sorted(labels.tolist())
    xs = [x for x, _ in batches]
    assert xs[0].dtype == torch.float32 and xs[0].shape == (16, 3, 32, 32) and xs[-1].shape[0] == 2
    ordered = D.Batches(images, labels, 16, False, 4, True, False)
    assert torch.equal(torch.cat([y for _, y in ordered]), labels)  # evaluation: in order, unaugmented


def test_alternating_flips_flip_each_image_every_other_epoch():
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    ids = torch.arange(40)  # the labels name the images
    batches = D.Batches(images, ids, 16, True, 0, True, False, torch.Generator().manual_seed(0), alternate=True)
    plain, mirrored = D.normalize(images, False), D.normalize(images.flip(3), False)
    per_epoch = []
    for _ in range(3):
        flipped = torch.zeros(40, dtype=torch.bool)
        for x, y in batches:
            assert all(torch.equal(x[i], mirrored[j]) or torch.equal(x[i], plain[j]) for i, j in enumerate(y.tolist()))
            flipped[y] = torch.tensor([torch.equal(x[i], mirrored[j]) for i, j in enumerate(y.tolist())])
        per_epoch.append(flipped)
    assert 8 < int(per_epoch[0].sum()) < 32  # about half at random in the first epoch
    assert torch.equal(per_epoch[1], ~per_epoch[0]) and torch.equal(per_epoch[2], per_epoch[0])


def test_crop_fill_is_checked_by_the_config():
    assert Config().crop_fill == "reflect" and Config(crop_fill="zero").validate().crop_fill == "zero"
    with pytest.raises(ConfigError, match="--crop-fill must be one of: zero, reflect"):
        Config(crop_fill="wrap").validate()
