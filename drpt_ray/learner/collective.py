"""The data-parallel learner's collectives (torch.distributed); identities in a single process.

A `Learner` builds one `Collective()` at construction. Inside a Ray Train worker the default
process group is already initialised (gloo on CPU, NCCL on GPU) and the collective spans it; in a
plain process (the in-process SFT learner, tests, benches) it is the world of one and every
method returns its input unchanged, so the single-process learner is the N = 1 case of the same
code, bit for bit.

All reductions are SUMs over flat buffers (one collective per dtype per call). Under NCCL the
buffer travels through the rank's CUDA device and comes back to the tensors' own device; the
learner itself may hold CPU tensors.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch
import torch.distributed as dist


class Collective:
    """rank, world_size and the few collectives the learner needs."""

    def __init__(self) -> None:
        self.enabled = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.enabled else 0
        self.world_size = dist.get_world_size() if self.enabled else 1
        nccl = self.enabled and dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    @property
    def active(self) -> bool:
        """True when there is more than one rank (every method is an identity otherwise)."""
        return self.world_size > 1

    # ------------------------------------------------------------------------------------------

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """SUM over ranks of one tensor, same dtype and device (the input itself when alone)."""
        if not self.active:
            return x
        out = x.detach().clone()
        self.sum_([out])
        return out

    def sum_(self, tensors: Iterable[torch.Tensor]) -> None:
        """In-place SUM over ranks of a list of tensors (the same list, in the same order, on every rank)."""
        self._flat_inplace(tensors, lambda flat: dist.all_reduce(flat, op=dist.ReduceOp.SUM))

    def broadcast_(self, tensors: Iterable[torch.Tensor], src: int = 0) -> None:
        """Overwrite every rank's tensors with rank `src`'s (in place)."""
        self._flat_inplace(tensors, lambda flat: dist.broadcast(flat, src=src))

    def _flat_inplace(self, tensors: Iterable[torch.Tensor], collective) -> None:
        """Run `collective` on one flat buffer per dtype (one call instead of one per tensor), then
        copy the result back into the tensors."""
        tensors = list(tensors)
        if not self.active or not tensors:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
        for t in tensors:
            by_dtype[t.dtype].append(t)
        for dtype in sorted(by_dtype, key=str):  # the same order on every rank
            group = by_dtype[dtype]
            flat = torch.cat([t.detach().reshape(-1).to(self.device) for t in group])
            collective(flat)
            offset = 0
            with torch.no_grad():
                for t in group:
                    n = t.numel()
                    t.copy_(flat[offset : offset + n].view_as(t))
                    offset += n

    def gather_cat(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Concatenate every rank's 1-D `x` in rank order; returns (all, this rank's offset)."""
        if not self.active:
            return x, 0
        sizes = torch.zeros(self.world_size, dtype=torch.long, device=self.device)
        sizes[self.rank] = x.numel()
        dist.all_reduce(sizes, op=dist.ReduceOp.SUM)
        width = int(sizes.max())
        buf = torch.zeros(width, dtype=x.dtype, device=self.device)
        buf[: x.numel()] = x.detach().to(self.device)
        parts = [torch.empty_like(buf) for _ in range(self.world_size)]
        dist.all_gather(parts, buf)
        out = torch.cat([p[: int(n)] for p, n in zip(parts, sizes)]).to(x.device)
        return out, int(sizes[: self.rank].sum())

    def max(self, value: int) -> int:
        """The largest of the ranks' integers."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t[0])

    def check_same(self, value: int, what: str) -> None:
        """Raise on every rank unless all ranks hold the same integer (structure checks before a SUM)."""
        if not self.active:
            return
        t = torch.tensor([value, -value], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if int(t[0]) != value or -int(t[1]) != value:
            raise RuntimeError(f"data-parallel ranks disagree on {what}: this rank (rank {self.rank}) has {value}, "
                               f"the ranks range over [{-int(t[1])}, {int(t[0])}]")

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """grad <- SUM over ranks of grad, in place (each rank has already scaled its loss by its share).

        A parameter whose `.grad` is None on every rank stays None (AdamW skips it, as in one
        process); one that has a gradient on some rank only gets zeros elsewhere first.
        """
        if not self.active:
            return
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.long, device=self.device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        grads = []
        for p, h in zip(params, has.tolist()):
            if not h:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        self.sum_(grads)
