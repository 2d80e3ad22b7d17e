"""The version of normlab: its one home. The package re-exports it (``normlab.__version__``), pyproject.toml reads
it from this file without importing torch, every results.json and report names it, and CHANGELOG.md says what
changed in it."""

__version__ = "1.1.0.dev0"  # what CHANGELOG.md lists under Unreleased; a release drops ".dev0"
UNRECORDED = "before 1.0.0"  # a record that names no version: 1.0.0 is the first to write it into results.json
