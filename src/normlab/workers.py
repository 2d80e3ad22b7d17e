"""Local worker processes, one per model, that stop when their parent is stopped.

Each task runs in a fresh spawned process (clean thread pools, its own peak-memory figure), at most ``n`` at a time.
The parent alone starts them, so when it is interrupted (Ctrl-C, SIGTERM: ``stops.py``) no queued task starts;
every running one gets SIGTERM (a model keeps its last checkpoint and releases its folder's lock) and is waited
for, up to STOP_GRACE_S seconds, or killed at once at a second Ctrl-C.
"""
from __future__ import annotations

import collections
import contextlib
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from normlab import stops
from normlab.errors import TrainingError

STOP_GRACE_S = 10.0  # a stopped model needs well under a second to end its step and release its folder

Task = tuple[Callable[..., Any], tuple[Any, ...]]  # a picklable function and its arguments


def run(tasks: Sequence[Task], n: int, done: Callable[[int, BaseException | None], bool]) -> None:
    """Run ``tasks`` in worker processes, ``n`` at a time. ``done(i, error)`` hears of each as it ends (``error``: what it
    raised, None if it returned) and returns whether to start more; the running ones are always waited for."""
    ctx = multiprocessing.get_context("spawn")
    queued = collections.deque(range(len(tasks)))
    running: dict[int, tuple[multiprocessing.process.BaseProcess, Connection]] = {}
    more = True
    try:
        while running or (more and queued):
            while more and queued and len(running) < n:
                i = queued.popleft()
                receive, send = ctx.Pipe(duplex=False)
                process = ctx.Process(target=_child, args=(send, os.getpid(), *tasks[i]), name=f"normlab-worker-{i}")
                with stops.children_ignore_sigint():  # a Ctrl-C now is raised as this block ends, with the worker known
                    process.start()
                    running[i] = process, receive
                    send.close()
            ready = wait([c for _, c in running.values()] + [p.sentinel for p, _ in running.values()])
            for i, (process, receive) in list(running.items()):
                if receive in ready or process.sentinel in ready:
                    error = _outcome(process, receive)
                    del running[i]
                    more = done(i, error) and more
    except KeyboardInterrupt:
        _stop([p for p, _ in running.values()])
        raise
    finally:
        for _, receive in running.values():
            receive.close()


def _outcome(process, receive: Connection) -> BaseException | None:
    try:
        kind, value = receive.recv()
    except (EOFError, OSError):  # it ended without a word: killed, out of memory
        process.join()
        return TrainingError(f"its worker process ended without a result (exit status {process.exitcode})")
    finally:
        receive.close()
    process.join()
    return value if kind == "error" else None


def _stop(processes: list) -> None:
    """SIGTERM to every worker, then wait for them; kill those left after STOP_GRACE_S, or at once at a second stop."""
    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    try:
        for p in processes:
            p.join(max(0.0, deadline - time.monotonic()))
    except KeyboardInterrupt:  # a second Ctrl-C (or SIGTERM): no more waiting
        pass
    for p in processes:
        while p.is_alive():
            try:
                p.kill()
                p.join()
            except KeyboardInterrupt:
                continue


def _child(send: Connection, parent: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """A worker process: run ``fn(*args)``, send back ("ok", result) or ("error", exception)."""
    try:
        try:
            stops.as_worker(parent)
            outcome = ("ok", fn(*args))
        except KeyboardInterrupt:
            outcome = ("error", TrainingError("stopped by SIGTERM before it finished; its last complete epoch is kept, resume it with --resume"))
        except BaseException as e:
            outcome = ("error", e)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the outcome goes back whole
        try:
            send.send(outcome)
        except OSError:  # the parent is gone
            pass
        except Exception:  # an exception that does not pickle: its text
            with contextlib.suppress(OSError):
                send.send(("error", TrainingError(" ".join(str(outcome[1]).split()) or type(outcome[1]).__name__)))
    except KeyboardInterrupt:  # SIGTERM between the two blocks: the parent hears of a worker that ended without a result
        pass
    finally:
        send.close()
