"""The ranks of a distributed checkpoint run, on ``torch.distributed``.

A run is distributed when the environment says so the way ``torchrun`` does (``WORLD_SIZE``
> 1 with ``RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``), or when the caller already initialised
a default process group. Only small Python objects travel through the process group (the
gloo backend, on CPU, whatever device the ranks quantize on): statuses, the nonce that proves
the output folder is shared, the report. Tensors travel through the output's journal folder
(:mod:`monoquant_core.journal`), which must be on a file system every rank sees.

:class:`Group` is also the single-process case (``world == 1``: every call is local), so
checkpoint mode has one code path. :func:`assign` splits the tensors between the ranks by
estimated cost (longest first, to the least loaded rank), deterministically, so every rank
computes the same assignment without talking.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import MonoQuantError, UsageError

__all__ = ["Group", "RankFailed", "assign", "current_group", "spawn_ranks", "start_method"]

T = TypeVar("T")

#: how long a rank waits for the others at one step (the slowest rank's share of the work);
#: ``MONOQUANT_DIST_TIMEOUT_S`` overrides it
_TIMEOUT_S = 24 * 3600


class RankFailed(UsageError):
    """Another rank failed: every rank raises this; only rank 0 prints it (``echo``)."""

    def __init__(self, problem: str, fix: str | None, echo: bool):
        super().__init__(problem, fix)
        self.echo = echo


class Group:
    """This process's place in the run: ``rank`` of ``world`` (1: not distributed)."""

    def __init__(self, rank: int = 0, world: int = 1, owned: bool = False):
        self.rank, self.world, self._owned = rank, world, owned

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist  # deferred: only distributed runs need it

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist  # deferred: only distributed runs need it

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def step(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` on this rank, then wait for every rank; if any rank failed, every rank
        raises the first failure (:class:`RankFailed`, naming the rank and its host). A
        single process just runs ``fn`` (its exceptions unchanged)."""
        if self.world == 1:
            return fn()
        try:
            result, status = fn(), None
        except MonoQuantError as e:
            result, status = None, (e.problem, e.fix)
        except Exception as e:
            notes = "".join(f" ({n})" for n in getattr(e, "__notes__", ()))
            result, status = None, (f"{type(e).__name__}: {e}{notes}", None)
        statuses = self.gather(None if status is None else (*status, socket.gethostname()))
        for r, s in enumerate(statuses):
            if s is None:
                continue
            problem, fix, host = s
            raise RankFailed(
                f"rank {r} of {self.world} (host {host}) failed while {what}: {problem}",
                fix,
                echo=self.is_root,
            )
        return result  # type: ignore[return-value]

    def close(self) -> None:
        if self._owned:
            import torch.distributed as dist  # deferred: only distributed runs need it

            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def current_group() -> Group:
    """The run's group: an existing default process group, a new one from torchrun's
    environment variables, or the single-process group."""
    try:
        import torch.distributed as dist  # deferred: keeps `import monoquant_core` light
    except ImportError:  # pragma: no cover - torch built without distributed
        return Group()
    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size())
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Group()
    if not dist.is_available():
        raise UsageError(
            f"WORLD_SIZE={world} asks for a distributed run, and this torch build has no "
            "torch.distributed",
            "install a torch build with distributed support, or unset WORLD_SIZE",
        )
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(var):
            raise UsageError(
                f"WORLD_SIZE={world} is set but {var} is not",
                "start the ranks with torchrun (or `monoquant quantize --workers N`), which "
                "sets RANK, MASTER_ADDR and MASTER_PORT",
            )
    timeout = float(os.environ.get("MONOQUANT_DIST_TIMEOUT_S", _TIMEOUT_S))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    return Group(dist.get_rank(), dist.get_world_size(), owned=True)


def assign(costs: list[float], world: int) -> list[int]:
    """The rank of each item: longest first to the least loaded rank (ties: lower index,
    lower rank), so every rank computes the same split."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


def spawn_ranks(world: int, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` on ``world`` local processes that form one gloo process group
    (``--workers N``: what torchrun does, on this machine); returns rank 0's result.

    Each process gets ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` and, unless
    ``OMP_NUM_THREADS`` is set, an equal share of the cores as intra-op threads. A rank's
    error is re-raised here once (the one every rank agreed on); a rank that dies (killed,
    crashed) ends the others and fails the run with one line naming it. The ranks are forked
    where that is safe (:func:`start_method`), so they start at once instead of importing
    Python and torch again (2-3 s each on a small VM).
    """
    import multiprocessing as mp  # deferred: only --workers needs it

    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // world))
    ctx = mp.get_context(start_method(threads))
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(r, world, port, threads, results, fn, args),
            name=f"monoquant-rank-{r}",
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    try:
        return _wait(procs, results)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)


def start_method(threads: int = 1) -> str:
    """How ``--workers`` starts ranks of ``threads`` intra-op threads each: ``"fork"`` where
    a forked child is safe, else ``"spawn"``. ``MONOQUANT_WORKER_START=spawn|fork`` overrides.

    Fork is used on Linux when each rank runs one thread (a forked child that starts an
    OpenMP team after its parent started one hangs in GNU OpenMP; with one thread torch
    starts none), this process runs no other Python thread (one could hold a lock the child
    inherits) and CUDA is not initialised. Otherwise each rank imports Python and torch again.
    """
    forced = os.environ.get("MONOQUANT_WORKER_START", "")
    if forced:
        if forced not in ("fork", "spawn"):
            raise UsageError(
                f"MONOQUANT_WORKER_START={forced!r}", "set it to fork or spawn, or unset it"
            )
        return forced
    cuda = sys.modules.get("torch.cuda")
    if (
        not sys.platform.startswith("linux")
        or threads != 1
        or threading.active_count() != 1
        or (cuda is not None and cuda.is_initialized())
    ):
        return "spawn"
    return "fork"


def _wait(procs: list[Any], results: Any) -> Any:
    """Rank 0's result, or the first failure (a reported error, or a rank that died)."""
    import queue  # deferred: only --workers needs it

    answer: dict[int, tuple[str, Any]] = {}
    while True:
        try:
            rank, kind, value = results.get(timeout=0.2)
            answer[rank] = (kind, value)
        except queue.Empty:
            pass
        if 0 in answer:
            kind, value = answer[0]
            if kind == "ok":
                for p in procs:
                    p.join()
                return value
            _raise_dead(procs, answer)  # a killed rank explains rank 0's failure best
            raise _rebuild(value)
        _raise_dead(procs, answer)
        if all(p.exitcode is not None for p in procs) and 0 not in answer:
            raise UsageError(
                "rank 0 ended without a result",
                "see the messages above; rerun with --resume to reuse the finished tensors",
            )


def _raise_dead(procs: list[Any], answer: dict[int, Any]) -> None:
    """A one-line error for a rank that ended without reporting (killed, crashed)."""
    for r, p in enumerate(procs):
        if p.exitcode not in (None, 0) and r not in answer:
            how = (
                f"was killed by signal {-p.exitcode}"
                if p.exitcode < 0
                else f"exited with code {p.exitcode}"
            )
            raise UsageError(
                f"rank {r} of {len(procs)} (pid {p.pid}) {how} before it finished",
                "see its messages above; the finished tensors are kept next to the output: "
                "rerun with --resume to reuse them",
            )


def _rank_main(
    rank: int, world: int, port: int, threads: int, results: Any, fn: Callable[..., Any], args: Any
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch  # deferred: the child sets its threads before any work

    torch.set_num_threads(threads)
    try:
        results.put((rank, "ok", fn(*args)))
    except MonoQuantError as e:
        results.put((rank, "error", (type(e), e.problem, e.fix)))
    except BaseException as e:
        results.put((rank, "error", (UsageError, f"{type(e).__name__}: {e}", None)))


def _rebuild(value: tuple[type, str, str | None]) -> MonoQuantError:
    cls, problem, fix = value
    try:
        return cls(problem, fix)
    except TypeError:  # a subclass with another constructor
        return UsageError(problem, fix)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
