"""Device selection and torchrun (DDP) process-group helpers that degrade to no-ops in a single process.

Under torchrun a job must fail as one: inputs are checked on every rank and
agreed on (`on_every_rank`) before any other collective, so bad input stops
every rank with the same error, reported once; a collective that loses a peer
(a crash, a kill) or waits longer than the job's timeout raises `PeerError`
instead of hanging.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, List, Optional, Tuple, Type, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for gloo; NCCL's watchdog uses the same value
_COLLECTIVE_FAILURE = re.compile(r"gloo|NCCL|Connection (reset|closed) by peer|Timed out waiting \d+ms")
_control_group: Optional[dist.ProcessGroup] = None  # a gloo group for agreeing on errors, whatever the backend


class PeerError(RuntimeError):
    """Another process of the job failed, was killed or did not answer within the timeout: this one stops too."""


class RankError(ValueError):
    """Bad input found on some rank while every rank checked its inputs; raised on every rank, reported by one."""

    def __init__(self, message: str, report: bool) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly single-process) torchrun job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _check_cuda_index(index: int, label: str) -> None:
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise ValueError(f"{label}: only {count} CUDA devices")


def check_device(name: str, what: str) -> torch.device:
    """``name`` (cpu, cuda or cuda:N) as a torch.device that this machine has; ``what`` names it in the errors
    (``--device cuda:1``, ``latency device 'cuda'``). The one device check of the scripts and the latency code."""
    try:
        parsed = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown {what}: expected cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type != "cuda":
        raise ValueError(f"unknown {what}: expected cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"{what} is not there: CUDA is not available on this machine")
    if parsed.index is not None:
        _check_cuda_index(parsed.index, f"{what} is not there")
    return parsed


def parse_device(device: str | None = None, gpus: str | None = None) -> torch.device:
    """Turn `--device cpu|cuda|cuda:N` or `--gpus 0,1` into a validated torch.device.

    `--gpus` returns the first listed GPU (one process per GPU: use torchrun for several);
    with neither given, CUDA is used when available, else the CPU.
    """
    if gpus is not None:
        if device is not None and not device.startswith("cuda"):
            raise ValueError(f"--gpus {gpus} conflicts with --device {device}")
        try:
            indices = [int(part) for part in gpus.split(",")]
        except ValueError:
            raise ValueError(f"--gpus {gpus!r}: expected comma-separated GPU indices such as 0,1") from None
        for index in indices:
            _check_cuda_index(index, f"--gpus {index}")
        return torch.device("cuda", indices[0])
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(device, f"--device {device}")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 outside torchrun); readable before the group is joined."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _rank_device(device: str | None, local_rank: int) -> torch.device:
    """The device of a torchrun process: cuda:LOCAL_RANK (made current) or the CPU."""
    wanted = parse_device(device)
    if wanted.type != "cuda":
        return wanted
    if device is not None and wanted.index is not None:
        raise ValueError(f"--device {device}: under torchrun each process uses cuda:LOCAL_RANK; "
                         "pass --device cuda and pick GPUs with CUDA_VISIBLE_DEVICES")
    _check_cuda_index(local_rank, f"LOCAL_RANK={local_rank}")
    wanted = torch.device("cuda", local_rank)
    torch.cuda.set_device(wanted)
    return wanted


def init_distributed(device: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Join the torchrun process group described by RANK/WORLD_SIZE/LOCAL_RANK, or run as a single process.

    Under torchrun each process uses cuda:LOCAL_RANK (NCCL) or the CPU (gloo);
    a collective waits at most ``timeout_s`` seconds for the others. The
    device is checked on every rank after joining, so a bad one stops all.
    """
    if not timeout_s > 0:
        raise ValueError(f"--dist_timeout must be a positive number of seconds, got {timeout_s}")
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return DistInfo(rank=0, world_size=1, local_rank=0, device=parse_device(device), is_main=True)
    if "RANK" not in os.environ:
        raise ValueError(f"WORLD_SIZE={world_size} but RANK is not set; launch with torchrun")
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    nccl = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if not dist.is_initialized():
        global _control_group
        timeout = timedelta(seconds=timeout_s)
        try:
            dist.init_process_group(backend="nccl" if nccl else "gloo", world_size=world_size, rank=rank,
                                    timeout=timeout)
        except RuntimeError as err:  # a taken port, an unreachable master, the others not coming in time
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise PeerError(f"rank {rank}: cannot join the job's process group at {where} "
                            f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from err
        _control_group = dist.new_group(backend="gloo", timeout=timeout) if nccl else None
    wanted = on_every_rank(lambda: _rank_device(device, local_rank))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=wanted, is_main=rank == 0)


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """True on rank 0, and always in a single process."""
    return not is_distributed() or dist.get_rank() == 0


def peer_failure(err: BaseException) -> Optional[PeerError]:
    """``err`` as a PeerError when it is a collective that lost a peer or timed out (DDP's included), else None."""
    if isinstance(err, PeerError):
        return err
    if not is_distributed() or not isinstance(err, RuntimeError):
        return None
    if not (isinstance(err, getattr(dist, "DistError", ())) or _COLLECTIVE_FAILURE.search(str(err))):
        return None
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    reason = re.sub(r"^\[[^\]]*\]\s*", "", reason).split(". ")[0]  # gloo's "[file.cc:545] Read error ...: why"
    return PeerError(f"rank {dist.get_rank()}: another process of the job stopped or did not answer within the "
                     f"timeout ({reason}); its own error, if it printed one, says why")


def _collective(run: Callable[[], T]) -> T:
    """Run a collective; a lost peer or a timeout becomes a PeerError."""
    try:
        return run()
    except RuntimeError as err:
        peer = peer_failure(err)
        if peer is None:
            raise
        raise peer from err


def on_every_rank(check: Callable[[], T], expected: Tuple[Type[BaseException], ...] = (ValueError, OSError)) -> T:
    """Run ``check`` on every rank, then agree (a collective): if it raised on any rank, it raises on all.

    An ``expected`` error (bad input) becomes a RankError everywhere, reported
    by rank 0 alone and naming the rank it came from unless every rank had
    it; anything else is re-raised where it happened and is a PeerError on
    the other ranks. In a single process ``check`` simply runs.
    """
    if not is_distributed():
        return check()
    result, mine = None, None
    try:
        result = check()
    except Exception as err:  # shared with the other ranks below, then raised
        mine = err
    status = None if mine is None else (isinstance(mine, expected), str(mine) or type(mine).__name__)
    statuses: List[Optional[Tuple[bool, str]]] = [None] * dist.get_world_size()
    _collective(lambda: dist.all_gather_object(statuses, status, group=_control_group))
    failed = [(rank, s) for rank, s in enumerate(statuses) if s is not None]
    if not failed:
        return result
    rank = dist.get_rank()
    _leave_together()
    if mine is not None and not status[0]:
        raise mine
    first_rank, (was_expected, message) = failed[0]
    if not was_expected:
        raise PeerError(f"rank {rank}: rank {first_rank} failed while checking its inputs: {message}")
    if len(failed) < len(statuses) or len({s[1] for _, s in failed}) > 1:
        message = f"rank {first_rank}: {message}"
    raise RankError(message, report=rank == 0)


def _leave_together() -> None:
    """Before every rank stops on an agreed error: one more barrier, so that rank 0 (which hosts the store) cannot
    exit while another rank is still reading the agreement, then leave the group. Left to the process exit, the
    group's threads can read a connection the other rank's exit just closed, and the process aborts ("terminate
    called without an active exception") instead of exiting 2. The barrier's own failure changes nothing: the
    outcome is known."""
    try:
        dist.barrier(group=_control_group)
    except RuntimeError:
        pass
    cleanup()


def same_on_every_rank(value: Any, what: str) -> None:
    """Refuse, on every rank, a job whose ranks disagree about ``value`` (a collective), e.g. the weights' hash."""
    if not is_distributed():
        return
    values: List[Any] = [None] * dist.get_world_size()
    _collective(lambda: dist.all_gather_object(values, value, group=_control_group))
    other = next((rank for rank, v in enumerate(values) if v != values[0]), None)
    if other is not None:
        report = dist.get_rank() == 0
        _leave_together()
        raise RankError(f"ranks disagree on {what}: rank 0 has {values[0]!r}, rank {other} {values[other]!r}",
                        report=report)


def from_main_rank(value: T) -> T:
    """Rank 0's ``value`` on every rank (a collective; ``value`` itself in a single process), e.g. the folder it
    chose to write to."""
    if not is_distributed():
        return value
    box = [value]
    _collective(lambda: dist.broadcast_object_list(box, src=0, group=_control_group))
    return box[0]


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` in place across processes (no-op in a single process); returns it."""
    if is_distributed():
        _collective(lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM))
    return tensor


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            _collective(lambda: dist.barrier(device_ids=[torch.cuda.current_device()]))
        else:
            _collective(dist.barrier)


def cleanup() -> None:
    """Leave the process group, if one was joined: after a success, or once every rank agreed to stop (a group that
    lost a peer is left to the process exit)."""
    global _control_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _control_group = None
