"""One merge across processes, GPUs and nodes, on torch.distributed (launched by torchrun).

Every rank opens the headers and computes the same plan: the output's shard layout (the same
pure function of the headers and --max-shard-size a one-process merge uses) and the
assignment of whole shards to ranks (`assign_shards`, byte-balanced, deterministic). A rank
computes the statistics of its tensors and merges and writes its own shards into the shared
partial directory; rank 0 prepares that directory, writes the index and publishes it.

All communication is `World.exchange`: every rank hands in a Python object and gets every
rank's back (all_gather_object). A rank that fails hands in its error instead, at the next
exchange the others reach, so every rank stops with a message naming the rank that failed;
a rank that dies outright closes its connections and the others stop too. Whole-model
statistics travel as integers (histogram counts, sign sums) or as per-tensor float L1 norms
summed with math.fsum (correctly rounded, independent of order), so thresholds and α are
bitwise the same for any world size and any assignment.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

from .errors import MergeInputError

# torchrun sets these for every process it starts.
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# How long a rank waits for the others at an exchange: a statistics pass over one rank's share
# of a 671B checkpoint can take many minutes. LINES_FAST_DIST_TIMEOUT (seconds) overrides it.
DEFAULT_TIMEOUT_S = 3 * 3600


class RankFailure(MergeInputError):
    """Another rank failed, or the group was lost: this rank stops without publishing."""


@dataclass
class World:
    """This process's place in the merge: rank of size. The one-process world (size 1) exchanges
    with itself, so the engine has one code path."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    _group: Any = None
    phase: str = "start"   # what the rank is doing, for the failure message

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, environ=os.environ) -> "World":
        """The world torchrun describes in the environment (size 1 without torchrun)."""
        if "WORLD_SIZE" not in environ:
            return cls()
        try:
            rank, size, local = (int(environ.get(k, "0")) for k in _ENV)
        except ValueError:
            raise MergeInputError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers, got "
                                  f"{[environ.get(k) for k in _ENV]}; launch with torchrun.") from None
        if size < 1 or not 0 <= rank < size:
            raise MergeInputError(f"RANK={rank} WORLD_SIZE={size}: rank must lie in 0..WORLD_SIZE-1; launch with "
                                  "torchrun.")
        return cls(rank, size, local)

    def join(self, use_cuda: bool) -> None:
        """Join the process group: gloo between CPU processes; with GPUs, NCCL for CUDA tensors and
        gloo for CPU ones. Exchanges carry only small CPU objects, so they take gloo either way:
        no GPU synchronisation, a dead peer noticed at once, and the same path CI tests."""
        if self.size == 1 or self._group is not None:
            return
        import torch
        import torch.distributed as dist

        if use_cuda:
            torch.cuda.set_device(self.local_rank)
        timeout = datetime.timedelta(seconds=float(os.environ.get("LINES_FAST_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise MergeInputError(f"WORLD_SIZE={self.size} but {' and '.join(missing)} not set: launch a distributed "
                                  "merge with torchrun (torchrun --nproc-per-node N -m lines_fast merge ...).")
        try:
            dist.init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo", rank=self.rank, world_size=self.size,
                                    timeout=timeout)
        except (RuntimeError, ValueError) as err:
            raise MergeInputError(f"rank {self.rank} of {self.size}: cannot join the process group at "
                                  f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({err}).") from None
        self._group = dist.group.WORLD

    def exchange(self, payload: Any) -> list[Any]:
        """Every rank's payload, in rank order; raises RankFailure where another rank reports a
        failure instead (World.fail) or the group is lost."""
        if self.size == 1:
            return [payload]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.size
        try:
            dist.all_gather_object(gathered, (None, payload))   # on the CPU: gloo (see join)
        except RuntimeError as err:
            raise RankFailure(
                f"rank {self.rank} of {self.size} lost contact with the other ranks while {self.phase} ({err}). "
                "Another rank exited or was killed: see its log. Nothing was published; rerun the same command "
                "(torchrun, or merge --workers) with --resume to keep the shards already written.") from None
        failed = [(r, e) for r, (e, _) in enumerate(gathered) if e is not None]
        if failed:
            ranks = ", ".join(str(r) for r, _ in failed)
            reasons = " ".join(f"Rank {r}, {e}" for r, e in failed)
            advice = "" if "--resume" in reasons else (" Shards already written are kept: fix the cause and rerun "
                                                         "the same command with --resume.")
            failure = RankFailure(f"rank{'s' if len(failed) > 1 else ''} {ranks} of {self.size} failed, so no rank "
                                  f"publishes the output. {reasons}{advice}")
            failure.shown_by_rank0 = not self.is_root   # rank 0 says it for every rank
            raise failure
        return [p for _, p in gathered]

    def fail(self, message: str) -> bool:
        """Tell the others this rank failed (at their next exchange); never raises. True where
        rank 0 failed with this same message, so it is shown there and this rank may stay quiet."""
        if self.size == 1 or self._group is None:
            return False
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.size
        try:
            dist.all_gather_object(gathered, (f"while {self.phase}: {message}", message))
        except RuntimeError:
            return False
        return not self.is_root and gathered[0][0] is not None and gathered[0][1] == message

    def leave(self) -> None:
        """Leave the process group (at the end of the command)."""
        if self._group is not None:
            import torch.distributed as dist

            try:
                dist.destroy_process_group()
            except (RuntimeError, ValueError):
                pass
            self._group = None


def assign_shards(costs: list[int], size: int) -> list[int]:
    """The rank of each shard: largest first to the least loaded rank (ties to the lower rank),
    so every rank computes the same assignment from the same headers."""
    owners = [0] * len(costs)
    load = [0] * size
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(size), key=lambda r: (load[r], r))
        owners[index] = rank
        load[rank] += costs[index]
    return owners


_current: World | None = None


def current_world() -> World:
    """This process's world, read from torchrun's environment once (a multi-document config's
    merges share it)."""
    global _current
    if _current is None:
        _current = World.from_env()
    return _current


def rank_label() -> str:
    """" (rank r of n)" in a distributed run, for messages; "" otherwise."""
    world = _current
    return f" (rank {world.rank} of {world.size})" if world is not None and world.size > 1 else ""


def leave_world() -> None:
    """Leave the process group if this process joined one (at the end of the command)."""
    if _current is not None:
        _current.leave()
