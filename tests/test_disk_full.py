"""A full disk is one line: a write that fails for want of room (ENOSPC; EDQUOT and EFBIG alike) names the folder
and its free space, exit 2, wherever normlab writes (checkpoints, records, the report, the data download). The
temporary file goes, the last good checkpoint stays, and a model that never finished an epoch leaves no folder.

A test cannot fill a real file system, so the disk here fills up at a chosen write: from then on torch's own writer
fails as it does on a full disk (part of the file written, then a RuntimeError that does not say why) and Python's
writes raise OSError ENOSPC."""
from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path

import pytest
import torch

from conftest import DEVICE, one_error_line
from normlab import data as D
from normlab.cli import main
from normlab.errors import DiskFullError
from normlab.rundir import CHECKPOINT, atomic_write_text

TRAIN = ["--epochs", "2", "--batch-size", "100", "--threads", "1", "--device", DEVICE]
NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"


class _NoRoom:
    """An open file on a full disk: every write fails."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, NO_SPACE)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


class Disk:
    """Full from the ``full_at``-th checkpoint on (1: the first epoch's), or at once (0): a write of a temporary file
    (*.tmp, *.part: all of normlab's writes) then fails."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, full_at: int = 0):
        self.checkpoints, self.full_at = 0, full_at
        real_open, real_save = builtins.open, torch.save

        def filling(file) -> bool:
            return self.full and str(file).endswith((".tmp", ".part"))

        def open_(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            return _NoRoom(f) if "r" not in mode and filling(file) else f

        def save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and Path(f).name == CHECKPOINT + ".tmp":
                self.checkpoints += 1
            if isinstance(f, (str, os.PathLike)) and filling(f):
                with real_open(f, "wb") as out:
                    out.write(b"PK\x03\x04 part of an archive")
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 273408 vs 273296")
            return real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)  # pathlib's read_text, write_bytes...
        monkeypatch.setattr(torch, "save", save)

    @property
    def full(self) -> bool:
        return self.checkpoints >= self.full_at


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.endswith((".tmp", ".part"))]


def test_a_full_disk_in_the_first_epoch_is_one_line_and_leaves_no_folder(data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "new" / "run"
    Disk(monkeypatch, full_at=1)
    assert main(["train", "--data-dir", str(data_dir), "--norm", "bn", *TRAIN, "--out", str(out)]) == 2
    err = one_error_line(capsys)
    assert f"cannot write {CHECKPOINT} in {out}: {NO_SPACE} (" in err and " free there, " in err and " needed)" in err
    assert "nothing was kept" in err
    assert not (tmp_path / "new").exists()


def test_a_full_disk_later_keeps_the_last_checkpoint_and_resumes(data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        Disk(m, full_at=2)
        assert main(["train", "--data-dir", str(data_dir), "--norm", "bn", *TRAIN, "--out", str(out)]) == 2
    err = one_error_line(capsys)
    assert f"cannot write {CHECKPOINT} in {out}: {NO_SPACE}" in err and "last complete epoch is kept: resume it with --resume" in err
    assert torch.load(out / CHECKPOINT, weights_only=True)["epoch"] == 1 and leftovers(out) == []
    assert main(["train", "--resume", str(out), "--data-dir", str(data_dir), "--threads", "1"]) == 0  # room again
    assert (out / "results.json").is_file()


def test_a_sweep_names_the_full_disk_in_its_failed_lines(data_dir, tmp_path, monkeypatch, capfd):
    out = tmp_path / "sweep"
    Disk(monkeypatch, full_at=2)
    assert main(["sweep", "--data-dir", str(data_dir), "--norms", "bn,gn", *TRAIN, "--out", str(out)]) == 2
    printed, err = capfd.readouterr()
    failed = [line for line in printed.splitlines() if ": FAILED: " in line]
    assert len(failed) == 2 and all(NO_SPACE in line and " free there" in line for line in failed), printed
    assert err.count("\n") == 1 and "Traceback" not in err and NO_SPACE in err
    assert leftovers(out) == []


def test_a_full_disk_while_writing_the_report_is_one_line(data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(data_dir), "--norm", "bn", *TRAIN, "--out", str(out)]) == 0
    capsys.readouterr()
    Disk(monkeypatch)
    assert main(["report", str(out)]) == 2
    assert f"cannot write samples.png in {out / 'figures'}: {NO_SPACE}" in one_error_line(capsys)  # its first file
    assert not (out / "report.md").exists() and leftovers(out) == []


def test_a_full_disk_during_the_download_is_one_line(tmp_path, monkeypatch, capsys):
    archive = tmp_path / "served" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(b"\0" * 100_000)
    monkeypatch.setattr(D, "URL", archive.as_uri())
    root = tmp_path / "new" / "data"
    Disk(monkeypatch)
    assert main(["train", "--data-dir", str(root), *TRAIN, "--out", str(tmp_path / "run")]) == 2
    err = one_error_line(capsys)
    assert f"cannot write cifar-10-python.tar.gz.part in {root}: {NO_SPACE}" in err and "341.0 MB needed" in err
    assert not (tmp_path / "new").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path, monkeypatch, code):
    path = tmp_path / "results.json"
    path.write_text("old\n")

    def no_room(self, data):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(Path, "write_bytes", no_room)
    with pytest.raises(DiskFullError, match=rf"cannot write results.json in {tmp_path}: {os.strerror(code)} \(.* free there, 4 kB needed\)"):
        atomic_write_text(path, "x" * 4000)
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
