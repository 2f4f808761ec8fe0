"""`lines-fast merge --workers N`: one merge over N processes of this machine.

On the CPU, torch parallelises inside each operation, and a merge's operations are many and
short (a 256K-element chunk each), so threads scale poorly (x1.35 at 2 threads for TIES here);
separate processes, each with its own share of whole shards, do not share that cost. This is
the distributed merge of distributed.py with the launcher built in: this process becomes rank
0 and starts ranks 1..N-1 as `python -m lines_fast` with the same arguments and torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, a free MASTER_PORT), so the
bytes, the failure handling and --resume are those of a torchrun merge, and the output is
byte-for-byte the one-process merge's.

Each rank gets cores / N threads (OMP_NUM_THREADS, NUMBA_NUM_THREADS, unless already set).
The other ranks are quiet; one that fails reports through rank 0, which prints the message;
one that crashes has its last lines of stderr printed here.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from .errors import MergeInputError

# Marks a rank this launcher started, so it does not launch again (it sees WORLD_SIZE set).
STARTED_BY = "LINES_FAST_WORKERS"
_THREAD_VARS = ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")
# How long the launcher waits for the other ranks once its own part is over: they finish at
# the same exchange as rank 0, so only a rank stuck outside the merge takes this long.
_FINISH_TIMEOUT_S = 120
# A rank that failed leaves only after rank 0 received its error (World.fail is an exchange),
# so rank 0 is then printing it and stopping. One that is gone while rank 0 still runs this
# much later died outside an exchange (before joining, or killed): rank 0 would only notice at
# its next exchange, or never before the group's timeout, so the launcher stops the merge.
_ORPHAN_GRACE_S = 10
# Exit statuses that are not a crash: done, a merge error (printed by rank 0), interrupted.
_QUIET_EXITS = (0, 2, 130, -signal.SIGINT, -signal.SIGTERM)


def check(workers: int, device: str) -> None:
    """Refuse what --workers cannot mean."""
    if workers < 1:
        raise MergeInputError(f"--workers {workers}: give a number of processes of 1 or more (1: this process only).")
    if workers > 1 and device in ("cuda", "interpret"):
        raise MergeInputError(f"--workers {workers} with --device {device}: workers are CPU processes on this "
                              "machine. For several GPUs launch one rank per GPU with torchrun "
                              "(torchrun --nproc-per-node N -m lines_fast merge ...).")
    if workers > 1 and "WORLD_SIZE" in os.environ and os.environ.get(STARTED_BY) != str(workers):
        raise MergeInputError(f"--workers {workers} inside a torchrun launch (WORLD_SIZE={os.environ['WORLD_SIZE']}): "
                              "use one or the other; torchrun's --nproc-per-node already starts the processes.")


def is_launcher(workers: int) -> bool:
    """True where this process must start the other ranks (not itself started by a launcher)."""
    return workers > 1 and os.environ.get(STARTED_BY) != str(workers)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In a started rank (Linux): get SIGTERM when the launcher dies, so no rank waits for a
    dead rank 0 until the exchange timeout."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Workers:
    """Ranks 1..N-1 of a local merge, started on entering and waited for on leaving; on
    entering, this process's environment makes it rank 0."""

    def __init__(self, workers: int, argv: list[str], log=None):
        self.workers, self.argv = workers, argv
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.procs: list[subprocess.Popen] = []
        # ignore_cleanup_errors: the watchdog's cleanup must never stop it from ending the merge.
        self._logs = tempfile.TemporaryDirectory(prefix="lines-fast-workers-", ignore_cleanup_errors=True)
        self._leaving = threading.Event()

    def __enter__(self) -> "Workers":
        threads = str(max(1, (os.cpu_count() or 1) // self.workers))
        shared = {"WORLD_SIZE": str(self.workers), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                  STARTED_BY: str(self.workers), **{k: os.environ.get(k, threads) for k in _THREAD_VARS}}
        # Rank 0 is this process: set before torch (and its thread pool) is first imported.
        os.environ.update({**shared, "RANK": "0", "LOCAL_RANK": "0"})
        for rank in range(1, self.workers):
            env = {**os.environ, **shared, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            err = open(Path(self._logs.name) / f"rank{rank}.err", "w")
            self.procs.append(subprocess.Popen([sys.executable, "-m", "lines_fast", *self.argv], env=env,
                                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                               preexec_fn=_die_with_parent))
            err.close()
        threading.Thread(target=self._watch, name="lines-fast-workers", daemon=True).start()
        return self

    def _last_words(self, rank: int) -> str:
        """The end of a worker's stderr, as ":\n<lines>", or "" where it wrote nothing."""
        text = (Path(self._logs.name) / f"rank{rank}.err").read_text(errors="replace").strip()
        return ":\n" + "\n".join(text.splitlines()[-15:]) if text else ""

    def _watch(self) -> None:
        """Stop the merge (exit 2) if a rank is gone with an error while rank 0 goes on."""
        while not self._leaving.wait(0.5):
            gone = [(rank, p.returncode) for rank, p in enumerate(self.procs, start=1) if p.poll() not in (None, 0)]
            if not gone or self._leaving.wait(_ORPHAN_GRACE_S):
                continue
            rank, code = gone[0]
            self.log(f"lines-fast merge: error: worker rank {rank} of {self.workers} exited with status {code} while "
                     "rank 0 was still merging, so the merge stops and nothing is published. Shards already "
                     f"written are kept: fix the cause and rerun the same command with --resume{self._last_words(rank)}")
            for p in self.procs:
                if p.poll() is None:
                    p.terminate()
            self._logs.cleanup()   # os._exit runs no finalizer: the logs go now or never
            os._exit(2)   # rank 0 may be blocked in the process group; its lock dies with it

    def __exit__(self, kind, value, traceback) -> None:
        self._leaving.set()
        try:
            for rank, proc in enumerate(self.procs, start=1):
                try:
                    code = proc.wait(timeout=_FINISH_TIMEOUT_S if kind is None else 10)
                except subprocess.TimeoutExpired:
                    proc.terminate()
                    code = proc.wait()
                if code not in _QUIET_EXITS:
                    self.log(f"lines-fast merge: worker rank {rank} of {self.workers} exited with status {code}"
                             f"{self._last_words(rank)}")
        finally:
            self._logs.cleanup()
