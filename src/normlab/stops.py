"""Stops that stop: SIGINT (Ctrl-C) and SIGTERM end a training command the same way, at once and cleanly.

In the command line SIGTERM raises ``Stopped``, a KeyboardInterrupt, in the main thread, as Ctrl-C raises
KeyboardInterrupt: both take one path, on which every model keeps its last checkpoint and the command prints how to
resume and exits 128 + the signal's number (130, 143). Worker processes (``workers.py``) are born ignoring SIGINT and
stop at the SIGTERM their parent sends them, so one process decides whether the signal reached it alone or its whole
process group (a Ctrl-C at the terminal), and a worker in its start-up prints no traceback.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Iterator

_taken = False  # SIGTERM raises Stopped (inside sigterm_stops)
_first: int | None = None  # the signal that began the stop: a library may raise its own KeyboardInterrupt for it (Ray does)


class Stopped(KeyboardInterrupt):
    """SIGTERM arrived: raised where Ctrl-C raises KeyboardInterrupt."""

    signum = signal.SIGTERM


def received(stop: KeyboardInterrupt) -> int:
    """The signal that ended the command: the first one caught inside ``sigterm_stops``, else ``stop``'s own."""
    return _first or int(getattr(stop, "signum", signal.SIGINT))


def exit_status(stop: KeyboardInterrupt) -> int:
    """The exit status of a command ended by ``stop``: 128 + its signal's number, as a shell reports it (130, 143)."""
    return 128 + received(stop)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # signal.signal works there only


def _raise_stopped(signum, frame) -> None:
    global _first
    _first = _first or signum
    raise Stopped()


def _raise_interrupt(signum, frame) -> None:
    global _first
    _first = _first or signum
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_stops() -> Iterator[None]:
    """Inside, SIGTERM raises ``Stopped`` in the main thread, and the first of SIGINT and SIGTERM is remembered
    (``received``). The command line's scope: a library takes no signals."""
    global _taken, _first
    if not _main_thread():
        yield
        return
    _first = None
    old = signal.signal(signal.SIGTERM, _raise_stopped)
    old_int = signal.getsignal(signal.SIGINT)
    if old_int is signal.default_int_handler:  # not where SIGINT is ignored (a background job)
        signal.signal(signal.SIGINT, _raise_interrupt)
    _taken = True
    try:
        yield
    finally:
        _taken = False
        signal.signal(signal.SIGTERM, old)
        if old_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, old_int)


def retake() -> None:
    """SIGTERM back to ``Stopped`` after a library took it (``ray.init`` sets a handler that exits with status 15)."""
    if _taken and _main_thread():
        signal.signal(signal.SIGTERM, _raise_stopped)


@contextlib.contextmanager
def children_ignore_sigint() -> Iterator[None]:
    """Processes started inside are born ignoring SIGINT (an ignored signal stays ignored across exec, and Python keeps
    it so); a Ctrl-C pressed meanwhile is held back (blocked, not lost) and raised here as the block ends."""
    if not _main_thread():
        yield
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def as_worker(parent: int) -> None:
    """The signals of a worker process: SIGINT ignored (its parent decides), SIGTERM a ``Stopped`` raised once (a
    second one while it cleans up is ignored), and on Linux SIGTERM when its parent dies, even by SIGKILL."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop_once)
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the line above: stop now
        raise Stopped()


def _stop_once(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Stopped()
