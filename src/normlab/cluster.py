"""The Ray executor: each job of a plan is a Ray task with its own CPU/GPU request; its files come back
to the driver. Ray is an optional extra (``pip install 'normlab[ray]'``); nothing here imports it
until a sweep asks for it.

No shared file system is assumed. The driver ships the CIFAR-10 files once through Ray's object
store (each node keeps one copy in its scratch folder); a task trains its model in a node-local
scratch folder and returns the folder's files as bytes, which the driver writes into ``--out``
(each file atomically, ``results.json`` last, so a half-written model never looks finished).

A worker that dies mid-model (killed, out of memory, its node lost) costs that model's work only:
Ray runs the task again (``max_retries``), and a retry that lands on the same node resumes from the
checkpoint its predecessor left in the scratch folder; elsewhere it starts again. The other tasks
are untouched and every model already written at the driver stays. A Python error in a task (bad
data, a diverged training) is not retried: it is reported and the other models finish.

Ray's own security defaults are kept: a cluster started with token authentication (``RAY_AUTH_MODE=token``,
the default of a local ``ray.init()`` since Ray 2.59) is joined with the token Ray finds (``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``); normlab never turns it off and never sends a token itself.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab import data as D
from normlab import folders, stops
from normlab.config import Config
from normlab.device import Runtime, set_threads, worker_runtimes
from normlab.errors import ConfigError, DiskFullError, NormlabError, UsageError
from normlab.lock import FolderLock
from normlab.plan import RESUME, SKIP, Failures, Job, TrainFn
from normlab.rundir import CHECKPOINT, CONFIG, RESULTS, RunDir, atomic_write_bytes, load_pt

EXTRA = "pip install 'normlab[ray]'"
SCRATCH = "normlab-scratch"   # under the node's temporary folder, unless --ray-scratch names another
WORKER = ".normlab-worker.json"  # in a model's scratch folder: the sweep, process and host training it
CONNECT_TIMEOUT_S = 10.0      # to open a TCP connection to the cluster's address before Ray tries (Ray itself waits minutes)
JOIN_TIMEOUT_S = 60.0         # for ray.init to join it (a refused token takes Ray about 20 s to report)
DATA_FILES = (*D.TRAIN_FILES, *D.TEST_FILES, "batches.meta")
HERE = "<normlab-model-folder>"  # a task's error messages name its scratch folder so; the driver puts the model's folder there


@dataclass(frozen=True)
class RayOptions:
    """Where and how the tasks run: the cluster's address and what each model asks of a node."""

    address: str = "auto"       # auto (the cluster `ray start` runs on this machine, or $RAY_ADDRESS) | local | HOST:PORT
    cpus: float = 1.0           # CPUs per model (also its torch threads, unless --threads says otherwise)
    gpus: float = 0.0           # GPUs per model; a fraction (0.25) lets several small models share one GPU
    retries: int = 3            # Ray's max_retries: how often a model whose worker died is run again
    scratch: str | None = None  # node-local folder where models train (default: each node's temporary folder)

    def validate(self) -> "RayOptions":
        if not _address_ok(self.address):
            raise ConfigError(f"--ray must be auto, local or HOST:PORT (got {self.address!r})")
        if not self.cpus > 0:
            raise ConfigError(f"--ray-cpus must be above 0 (got {self.cpus})")
        if self.gpus < 0 or (self.gpus > 1 and not float(self.gpus).is_integer()):
            raise ConfigError(f"--ray-gpus must be 0, a fraction of one GPU (0.25) or a whole number of GPUs (got {self.gpus})")
        if self.retries < 0:
            raise ConfigError(f"--ray-retries must be 0 or more (got {self.retries})")
        return self


def _address_ok(address: str) -> bool:
    return address in ("auto", "local") or _host_port(address) is not None


def _host_port(address: str) -> tuple[str, int] | None:
    m = re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9._-]+):(\d{1,5})", address)
    return (m.group(1).strip("[]"), int(m.group(2))) if m and 0 < int(m.group(2)) < 65536 else None


# ---------------------------------------------------------------- the driver
def import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError(f"--ray needs Ray, an optional extra of normlab: {EXTRA}") from None
    return ray


def connect(options: RayOptions, log: Callable[[str], None]) -> bool:
    """Join (or, with ``local``, start) the cluster; returns whether this call did, so the caller disconnects after.
    One clear UsageError for a wrong address, an unreachable cluster, a refused token."""
    ray = import_ray()
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # the workers' lines Ray prints here: no colour codes in a log file
    if ray.is_initialized():  # a notebook that called ray.init itself: use its cluster, leave it connected
        log("Ray: using the cluster this process is already connected to")
        return False
    if options.address == "local":
        ray.init(include_dashboard=False, logging_level="WARNING")
        return True
    if options.address != "auto":
        host, port = _host_port(options.address)
        try:  # Ray retries an unreachable address for minutes: find out in seconds first
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as e:
            raise UsageError(f"cannot reach a Ray cluster at {options.address} ({e.strerror or type(e).__name__}); start one there with "
                             "`ray start --head`, or pass the address it printed (--ray HOST:PORT)") from None
    try:
        _init(ray, options.address)
    except UsageError:
        raise
    except ConnectionError as e:
        text = " ".join(str(x) for x in (e, e.__cause__, e.__context__))
        if options.address == "auto":
            raise UsageError("no running Ray cluster found (--ray auto): start one with `ray start --head`, pass its address "
                             "(--ray HOST:PORT), or use --ray local to start one for this sweep") from None
        if "Unauthenticated" in text or "InvalidAuthToken" in text or "AuthToken" in text:
            raise UsageError(f"the Ray cluster at {options.address} refused normlab's connection: it uses token authentication and "
                             "this machine has no matching token; copy the head node's token (`ray get-auth-token` there) to "
                             "~/.ray/auth_token here (or set RAY_AUTH_TOKEN) and set RAY_AUTH_MODE=token") from None
        raise UsageError(f"cannot join the Ray cluster at {options.address}: {str(e).splitlines()[0]}; is it a Ray cluster's "
                         "address (the one `ray start --head` printed)?") from None
    except (RuntimeError, ValueError) as e:  # e.g. a Ray or Python version that differs from the cluster's
        raise UsageError(f"cannot join the Ray cluster at {options.address}: {' '.join(str(e).split())[:300]}") from None
    return True


def _init(ray, address: str) -> None:
    """``ray.init(address)``, given up after JOIN_TIMEOUT_S: Ray retries for many minutes where the head advertises an
    address this machine cannot reach (its own IP behind NAT, a loopback-only head), even after the TCP check passed."""
    box: dict[str, Any] = {}

    def join() -> None:
        try:
            ray.init(address=address, logging_level="ERROR")  # ERROR: not the warning that this thread is not the main one
        except BaseException as e:  # handed to the caller
            box["error"] = e

    thread = threading.Thread(target=join, name="normlab-ray-join", daemon=True)  # a daemon: a stuck join does not block exit
    with _stderr_kept_back() as kept:  # Ray's C++ client logs every failed try (a line a second) to the process's stderr
        thread.start()
        thread.join(JOIN_TIMEOUT_S)
    if "error" not in box and not thread.is_alive():
        sys.stderr.write(kept())  # joined: what Ray said may matter (a version warning); a failure gets one line of ours
    if thread.is_alive():
        raise UsageError(f"the Ray cluster at {address} did not let normlab join within {JOIN_TIMEOUT_S:.0f} s: Ray connects to the "
                         "addresses its head advertises, which this machine may not reach (`ray status` on the head shows them); "
                         "pass an address of the head that this machine reaches")
    if "error" in box:
        raise box["error"]


@contextlib.contextmanager
def _stderr_kept_back():
    """File descriptor 2 goes to a temporary file inside the block; yields a function that reads what it got."""
    sys.stderr.flush()
    saved, kept = os.dup(2), tempfile.TemporaryFile()
    os.dup2(kept.fileno(), 2)
    try:
        yield lambda: (kept.seek(0), kept.read().decode(errors="replace"))[1]
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def check_resources(options: RayOptions) -> None:
    """Refuse, before anything is submitted, a cluster where no node could run a model (its tasks would wait forever)."""
    ray = import_ray()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(r.get("CPU", 0) >= options.cpus and r.get("GPU", 0) >= options.gpus for r in nodes):
        return
    have = "; ".join(f"{r.get('CPU', 0):g} CPUs, {r.get('GPU', 0):g} GPUs" for r in nodes) or "no live node"
    raise UsageError(f"no node of the Ray cluster at {options.address} has {options.cpus:g} CPU(s) and {options.gpus:g} GPU(s) "
                     f"for a model (its nodes: {have}); lower --ray-cpus / --ray-gpus, or add such a node (ray start --address ...)")


def data_payload(data_dir: str | os.PathLike | None) -> tuple[str, dict[str, bytes]]:
    """The CIFAR-10 files the driver sees (checked, downloaded if absent) and a digest naming them on the nodes."""
    root = D.resolve_data_dir(data_dir)
    for train in (True, False):
        D.load_split(root, train=train)  # the data errors of a local run, here and now (and the download if absent)
    folder = root / D.FOLDER
    files = {name: (folder / name).read_bytes() for name in DATA_FILES if (folder / name).is_file()}
    digest = hashlib.sha256()
    for name, blob in sorted(files.items()):
        digest.update(name.encode() + b"\0" + blob)
    return digest.hexdigest()[:16], files


def sweep_key(out: Path) -> str:
    """Names the scratch folders of the sweep into ``out`` from this machine: a retry, and a later --resume, find them."""
    return hashlib.sha256(f"{socket.gethostname()}:{Path(out).resolve()}".encode()).hexdigest()[:16]


def execute_ray(jobs: Sequence[Job], train: TrainFn, data_dir: str | os.PathLike | None, runtime: Runtime, options: RayOptions,
                parent: Path, resume: bool, log: Callable[[str], None] = print) -> Failures:
    """Train the jobs not skipped as Ray tasks; write each model's files into its folder as it finishes. Returns the failures
    (a task's error, or a worker that died more than ``retries`` times); the other models finish."""
    options.validate()
    ray = import_ray()
    todo = [j for j in jobs if j.action != SKIP]
    if not todo:
        return []
    owned = connect(options, log)
    stops.retake()  # ray.init's own SIGTERM handler exits at once: SIGTERM cancels the tasks as Ctrl-C does
    pending: dict[Any, Job] = {}
    locks: dict[Path, FolderLock] = {}  # the driver writes each model's files: it holds their folders until they are in
    failures: Failures = []
    try:
        check_resources(options)
        digest, files = data_payload(data_dir)
        data = (digest, [ray.put(files)])  # in a list: a task fetches the bytes only if its node has no copy yet
        del files
        worker_runtime = worker_runtimes(runtime, 1, options.cpus, spread_gpus=False)[0]  # Ray assigns each task its GPUs
        threads = worker_runtime.threads
        task = ray.remote(num_cpus=options.cpus, num_gpus=options.gpus, max_retries=options.retries, retry_exceptions=False)(_run_model)
        key, attempt = sweep_key(parent), uuid.uuid4().hex
        for j in todo:
            try:
                locks[j.out] = FolderLock(j.out, folders.make(j.out)).acquire()
            except (NormlabError, OSError) as e:  # Busy: another normlab writes there, this model is left to it
                e = e if isinstance(e, NormlabError) else UsageError(f"cannot write into {j.out} ({e.strerror or e})")
                failures.append((j, e))
                log(f"{j.out}: FAILED: {e}")
                continue
            rel = j.out.relative_to(parent).as_posix()
            shipped = _folder_files(j.out) if j.action == RESUME else {}
            ref = task.options(name=f"normlab {rel}").remote(train, j.cfg.to_dict(), f"{key}/{rel}", attempt, shipped, data,
                                                              worker_runtime, options.scratch, resume)
            pending[ref] = j
        gpus = f", {options.gpus:g} GPU(s)" if options.gpus else ""
        log(f"Ray: {len(pending)} model{'s' * (len(pending) > 1)} submitted, each with {options.cpus:g} CPU(s){gpus} and {threads} thread(s); "
            f"cluster: {ray.cluster_resources().get('CPU', 0):g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs")
        return _collect(ray, pending, options, log, locks, failures)
    except KeyboardInterrupt:
        for ref in pending:  # the nodes keep each model's last checkpoint in their scratch folder for --resume
            ray.cancel(ref, force=True)
        raise
    finally:
        for held in locks.values():
            held.release()
        if owned:
            ray.shutdown()


def _collect(ray, pending: dict[Any, Job], options: RayOptions, log: Callable[[str], None], locks: dict[Path, FolderLock],
             failures: Failures) -> Failures:
    """Each task's files into its model's folder as it finishes (``pending`` empties as they do, and each folder's lock is
    released once its files are in); ``failures`` with those of these tasks added."""
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(done[0])
        try:
            payload = ray.get(done[0])
            receive(job.out, payload["files"])
        except ray.exceptions.RayTaskError as e:  # the task's own error, not retried
            cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else e
            if isinstance(cause, NormlabError):
                cause = type(cause)(str(cause).replace(HERE, str(job.out)))
            failures.append((job, cause))
            log(f"{job.out}: FAILED: {_one_line(cause)}")
            continue
        except ray.exceptions.RayError as e:  # Ray could not run it: its worker or node died more often than --ray-retries allows...
            why = f"its Ray worker died {options.retries + 1} time(s)" if isinstance(e, ray.exceptions.WorkerCrashedError) \
                else f"Ray could not run it ({type(e).__name__})"
            failures.append((job, UsageError(f"{why}: {_one_line(e)}")))
            log(f"{job.out}: FAILED: {why}")
            continue
        except OSError as e:
            failures.append((job, UsageError(f"trained, but its files cannot be written into {job.out} ({e.strerror or e})")))
            log(f"{job.out}: FAILED: cannot write its files ({e.strerror or e})")
            continue
        except DiskFullError as e:  # what it wrote stays, results.json (written last) not: --resume ships it back
            failures.append((job, e))
            log(f"{job.out}: FAILED: {e}")
            continue
        finally:
            if job.out in locks:
                locks.pop(job.out).release()
        log(f"{job.out}: finished on {payload['host']}{_history(payload)}")
    return failures


def _history(payload: dict[str, Any]) -> str:
    after = f"resumed after epoch {payload['resumed_after']}" if payload["resumed_after"] else ""
    if payload["retry"]:
        return f" (run again after its worker died: {after or 'started afresh'})"
    return f" ({after})" if after else ""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] or type(e).__name__


def _folder_files(folder: Path) -> dict[str, bytes]:
    """A model folder's files as bytes (not the hidden ones, not half-written .tmp files)."""
    if not folder.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".tmp")}


def receive(folder: Path, files: dict[str, bytes]) -> None:
    """Write a model's files into ``folder`` at the driver: each atomically, results.json (which marks it finished) last."""
    for name in files:
        if Path(name).name != name or name.startswith("."):
            raise UsageError(f"a Ray task returned a file named {name!r}, which is not a run folder's file; nothing was written")
    folder.mkdir(parents=True, exist_ok=True)
    for name in sorted(files, key=lambda n: n == RESULTS):
        atomic_write_bytes(folder / name, files[name])


# ---------------------------------------------------------------- on a worker node
def scratch_root(scratch: str | None) -> Path:
    return Path(scratch) if scratch else Path(tempfile.gettempdir()) / SCRATCH


def _checkpoint_epoch(blob_or_path: bytes | Path) -> int:
    """The epoch a checkpoint was saved after; 0 for one that cannot be read (training then says why, in its own words)."""
    try:
        ck = load_pt(io.BytesIO(blob_or_path) if isinstance(blob_or_path, bytes) else blob_or_path)
        return int(ck.get("epoch", 0)) if isinstance(ck, dict) else 0
    except Exception:
        return 0


def _usable(folder: Path, cfg: Config) -> int | None:
    """The epoch of a scratch folder's checkpoint if it is a checkpoint of ``cfg`` (None if there is none or it is another run's)."""
    rd = RunDir(folder)
    if not (rd.has_config and (rd.has_checkpoint or rd.finished)):
        return None
    try:
        if Config.load(folder / CONFIG) != cfg:
            return None
    except (OSError, ValueError, TypeError):  # unreadable or damaged: start again
        return None
    epoch = _checkpoint_epoch(folder / CHECKPOINT) if rd.has_checkpoint else cfg.epochs
    return epoch or None


def _node_data(root: Path, data: tuple[str, list]) -> Path:
    """This node's copy of the driver's CIFAR-10 files (written once per node, renamed into place whole)."""
    digest, (ref,) = data
    folder = root / f"cifar10-{digest}"
    if (folder / D.FOLDER).is_dir():
        return folder
    import ray

    tmp = root / f".cifar10-{digest}-{uuid.uuid4().hex}"
    (tmp / D.FOLDER).mkdir(parents=True)
    for name, blob in ray.get(ref).items():
        (tmp / D.FOLDER / name).write_bytes(blob)
    try:
        os.rename(tmp, folder)
    except OSError:  # another task on this node got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _run_model(train: TrainFn, cfg_dict: dict[str, Any], rel: str, attempt: str, shipped: dict[str, bytes], data: tuple[str, list],
               runtime: Runtime, scratch: str | None, may_resume: bool) -> dict[str, Any]:
    """One model, as a Ray task: train it in this node's scratch folder and return the folder's files.

    The folder is kept if its checkpoint is of this model and either an earlier try of this very task left it
    (a worker that died; ``attempt`` is the same) or the sweep resumes; else it starts from what the driver shipped."""
    root = scratch_root(scratch)
    folder = root / rel
    cfg = Config.from_dict(cfg_dict)
    marker = folder / WORKER
    try:
        retry = json.loads(marker.read_text()).get("attempt") == attempt
    except (OSError, ValueError):
        retry = False
    here = _usable(folder, cfg) if (retry or may_resume) else None
    there = _checkpoint_epoch(shipped[CHECKPOINT]) if CHECKPOINT in shipped else None
    if here is None or (there is not None and there > here):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name, blob in shipped.items():
            atomic_write_bytes(folder / name, blob)
        resumed_after = there
    else:
        resumed_after = here
    marker.write_text(json.dumps({"attempt": attempt, "pid": os.getpid(), "host": socket.gethostname()}) + "\n")
    rd = RunDir(folder)
    if not rd.finished:  # finished: an earlier try trained it all and died before its files reached the driver
        set_threads(runtime.threads)
        try:  # Ray shows each printed line at the driver, prefixed with the task's name (normlab bn/seed0) and pid
            train(cfg, _node_data(root, data), folder, resume=rd.has_checkpoint, runtime=runtime, log=lambda m: print(m, flush=True))
        except NormlabError as e:  # its message names the model's folder at the driver, where the user acts on it
            raise type(e)(str(e).replace(str(folder), HERE)) from None
    files = _folder_files(folder)
    shutil.rmtree(folder, ignore_errors=True)
    for empty in folder.parents:  # the cell's folders (bn/norm_batch=8/), up to the sweep's, once no model is left in them
        if empty == root:
            break
        try:
            empty.rmdir()
        except OSError:
            break
    return {"files": files, "host": socket.gethostname(), "retry": retry, "resumed_after": resumed_after or None}

