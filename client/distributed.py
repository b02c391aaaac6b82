"""The trainer on several processes: torch.distributed, as torchrun starts it.

``torchrun --nproc_per_node N client/main.py ...`` (or across machines with
torchrun's own rendezvous) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`from_environment` joins the
process group from them (gloo on the CPU, nccl on a GPU). Without them, or
with ``WORLD_SIZE=1``, it returns :data:`SINGLE` and nothing changes.

What the ranks exchange is tensors only: documents (metrics) travel as
UTF-8 JSON in uint8 tensors (:meth:`Ranks.gather_json`), never pickled.
"""

import datetime
import json
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist


class RankLost(RuntimeError):
    """Another rank stopped (failed, or was killed): this one cannot go on."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the run's processes."""

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"  # where collectives' tensors live (cuda:LOCAL_RANK with nccl)

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def leader(self):
        """Rank 0 writes checkpoints and metrics, evaluates, and logs."""
        return self.rank == 0

    def gather_json(self, doc):
        """Every rank's JSON document, in rank order (a collective: every rank calls it)."""
        if not self.distributed:
            return [doc]
        payload = torch.tensor(list(json.dumps(doc).encode()), dtype=torch.uint8,
                               device=self.device)
        size = torch.tensor([payload.numel()], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        with lost_rank_errors(self.rank):
            dist.all_gather(sizes, size)
            longest = int(max(s.item() for s in sizes))
            padded = torch.zeros(longest, dtype=torch.uint8, device=self.device)
            padded[:payload.numel()] = payload
            parts = [torch.zeros_like(padded) for _ in range(self.world_size)]
            dist.all_gather(parts, padded)
        return [json.loads(bytes(part[:int(n.item())].tolist()).decode())
                for part, n in zip(parts, sizes, strict=True)]

    def close(self):
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


SINGLE = Ranks()


def from_environment(device):
    """Join torchrun's process group when its environment says there are
    several ranks; return this process's :class:`Ranks` and its device
    (``cuda:LOCAL_RANK`` for a GPU run, so that each rank has its own)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE, device
    rank = int(os.environ["RANK"])
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    signal.signal(signal.SIGTERM, _stopped_by_torchrun(rank))
    return Ranks(rank=rank, world_size=world_size, device=device), device


def _stopped_by_torchrun(rank):
    """torchrun's agent ends the other ranks with SIGTERM when one fails:
    say so in one line instead of dying silently."""
    def handler(signum, frame):
        raise RankLost(f"rank {rank} stopped by torchrun: another rank of the run failed or "
                       "was killed; --resume continues from the last checkpoint")
    return handler


class lost_rank_errors:
    """Turn a collective's failure (a peer's connection gone) into :class:`RankLost`."""

    def __init__(self, rank):
        self.rank = rank

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if kind is not None and _peer_gone(err):
            raise RankLost(f"rank {self.rank} lost contact with the other ranks (one failed "
                           f"or was killed: {str(err).splitlines()[0]}); --resume continues "
                           "from the last checkpoint") from None
        return False


def _peer_gone(err):
    """Whether a collective failed because a peer went away: torch's
    distributed errors, and the plain RuntimeError that DDP's gradient
    all-reduce raises with the transport's message (gloo: "Connection reset
    by peer")."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and not isinstance(err, RankLost) and \
        any(word in text for word in ("gloo", "nccl", "connection"))
