"""The error types that the command line turns into one line on stderr (exit status 2).

Each is raised with a message that says what went wrong and what to do; the library raises them
and never exits, so a notebook sees the same messages as an exception.
"""
from __future__ import annotations


class NormlabError(RuntimeError):
    """Any expected failure: the message is one line for the user."""


class ConfigError(NormlabError, ValueError):
    """A setting is out of range; the message says which and what is allowed."""


class DataError(NormlabError):
    """The data set is missing, unreadable or unsafe; the message says what to do."""


class TrainingError(NormlabError):
    """Training cannot go on (a non-finite loss, an unusable run folder); the message says why."""


class UsageError(NormlabError):
    """A command was given something it cannot use; the message says what to do."""


class ReportError(NormlabError):
    """A run folder is missing or incomplete; the message names what is missing and what to do."""


class SweepError(TrainingError):
    """Some cells of a sweep failed; the others finished. ``result`` is the sweep as it stands (its files are written)."""

    def __init__(self, message: str, result: object = None):
        super().__init__(message)
        self.result = result

    def __reduce__(self):  # pickled with its result (the default keeps only the message)
        return type(self), (str(self), self.result)
