"""The version: one home (normlab/version.py, re-exported as normlab.__version__), read by pyproject.toml, printed by --version, and the
newest entry of CHANGELOG.md."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

import normlab
from normlab.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_a_release_number_or_the_next_ones_development_version():
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+)?", normlab.__version__)


def test_version_flag_prints_the_version_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"normlab {normlab.__version__}\n"


def test_version_flag_from_the_command_line():
    done = subprocess.run([sys.executable, "-m", "normlab.cli", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"normlab {normlab.__version__}"


def test_pyproject_reads_the_version_from_the_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 and later
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "normlab.version.__version__"}


def test_the_newest_changelog_entry_is_this_version():
    """A release is the newest entry; a development version (X.Y.Z.devN) is what Unreleased lists, after the newest release."""
    text = (ROOT / "CHANGELOG.md").read_text()
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", text, re.M)
    release, dev = re.fullmatch(r"(\d+\.\d+\.\d+)(\.dev\d+)?", normlab.__version__).groups()
    if dev is None:
        assert releases and releases[0] == release
    else:
        assert f"The version is {normlab.__version__}." in text.split("## [Unreleased]", 1)[1].split("\n## [", 1)[0]
        assert tuple(map(int, release.split("."))) > tuple(map(int, releases[0].split(".")))
