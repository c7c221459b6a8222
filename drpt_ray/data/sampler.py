"""Endless shuffled batches over a pool, with a two-int state for exact resume."""

from __future__ import annotations

import random


class BatchSampler:
    """Endless batches over a pool, reshuffled every epoch, with a two-int state for exact resume.

    Epoch e's order is a permutation seeded by (seed, e); a batch may straddle two epochs.
    """

    def __init__(self, pool: list, batch_size: int, seed: int):
        self.pool, self.batch_size, self.seed = pool, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.pool)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self) -> list:
        out = []
        while len(out) < self.batch_size:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            out.append(self.pool[self._order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._permutation(self.epoch)
