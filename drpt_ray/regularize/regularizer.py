"""The Regularizer: wraps one backward so that hooked weights receive curated gradients.

Usage (separate-batch target, the default):

    reg = Regularizer(model, spec)
    reg.capture_target(target_loss)                # token-mean over the target batch; cached per layer
    stats = reg.backward(loss_fn, units)           # loss_fn(rows) -> token-mean loss of those rows
    clip_grad_norm_(...); optimizer.step()

`loss_fn(rows)` returns the batch loss normalised over the rows it covers: sum of the rows'
per-token losses divided by the sum of their `units` (supervised tokens for token-mean; use
units = 1 and per-example means for a sequence-mean loss). rows=None is the whole batch. Only
GlobalSubset two-pass calls it a second time, on the selected rows. A plain loss tensor may be
passed instead of a callable when no second pass is needed.

Merged-batch target (`target_mode: merged`): the batch's last `n_target_rows` rows are target
rows sharing the backward (one token-mean over T_tot = T_train + T_val). Each hooked layer splits
them off, builds G_T from them, scales scores by T_tot^2 / (T_train T_val) so they equal
separate-batch scores, and curates only the train rows. Unhooked parameters (norm weights...) get
a train-rows-only gradient, rescaled by T_tot / T_train: a forward hook on their modules recomputes
target rows with detached parameters, so target rows still pass activation gradients upstream but
never reach those weights.

Choices where the paper's code leaves room (method.md 9):
- token counts are whatever the loss averages over (callers pass the shifted-label counts);
- an empty selection gives a zero gradient to every hooked weight (LayerWise: that layer; Global:
  all hooked weights, and in two-pass every parameter, since pass 2 has no rows). Zero, not None:
  AdamW still decays its moments, so parameters are not silently frozen out of the schedule;
- `.grad` is accumulated into (+=), so micro-batch gradient accumulation works; the cosine metrics
  read `.grad` and so describe the accumulated update.

Sharded parameters (FSDP, drpt_ray/learner/fsdp.py): inside a backward a hooked module holds its
all-gathered weight, so scoring and `_write_grad` work unchanged; outside one, parameters are
DTensors sharded by rows. The full-size target cache (ghost/direct kernels, embeddings) is then
sharded like its weight: each layer's captured g_T is reduce-scattered across the ranks as the
capture backward reaches it (the SUM over ranks of oracle 12, done here instead of by the
caller), and all-gathered again, one layer at a time, when a backward scores against it, as
FSDP does with the weights. Sketch caches (k x k) stay whole and are all-reduced by the caller
(`target_cache`). `target_only` writes the cached shard as the gradient, and the cosine metrics
are computed on local rows and summed over the ranks by `shard_sum` (they then describe the
reduced update).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, distribute_tensor

from drpt_ray.config import RegularizerSpec
from drpt_ray.regularize import kernels as K
from drpt_ray.regularize.feasible import example_weights, kept_fraction, membership, subset_weights
from drpt_ray.feasible_sets import FEASIBLE_SETS, Granularity
from drpt_ray.regularize.hooks import Block, BlockKind, find_blocks, install

LossFn = Callable[[torch.Tensor | None], torch.Tensor]


@dataclass
class RegStats:
    """What one regularized backward did. Per-block dicts are keyed by module name."""

    kept: dict[str, float] = field(default_factory=dict)
    cos: dict[str, float] = field(default_factory=dict)
    cos_overall: float | None = None
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    global_scores: torch.Tensor | None = None
    empty: bool = False
    score_seconds: float = 0.0
    seconds: float = 0.0

    def summary(self, prefix: str = "reg/") -> dict[str, float]:
        """Flat scalar metrics (what goes to JSONL / the metric stream)."""
        out = {f"{prefix}score_s": self.score_seconds,
               f"{prefix}time_s": self.seconds, f"{prefix}empty": float(self.empty)}
        for key, d in (("kept_frac", self.kept), ("cos_layer", self.cos)):
            if d:
                v = list(d.values())
                out.update({f"{prefix}{key}_mean": sum(v) / len(v),
                            f"{prefix}{key}_min": min(v), f"{prefix}{key}_max": max(v)})
        if self.cos_overall is not None:
            out[f"{prefix}cos"] = self.cos_overall
        return out


@dataclass
class _Pass:
    """State of the backward in flight: what each hooked layer should do with its (dY, X)."""

    mode: Literal["capture", "score", "layer", "retain"]
    units: torch.Tensor | None = None  # (n_rows,) all rows, target rows last in merged mode
    n_target: int = 0
    normaliser: float = 1.0  # N: the loss of this backward is sum / N
    score_scale: float = 1.0  # merged-mode correction
    scores: torch.Tensor | None = None  # accumulated global scores (score / retain)
    retained: dict = field(default_factory=dict)
    merged_targets: dict = field(default_factory=dict)
    stats: RegStats = field(default_factory=RegStats)

    @property
    def n_rows(self) -> int:
        return self.units.numel()

    @property
    def n_train(self) -> int:
        return self.n_rows - self.n_target


class Regularizer:
    """Dr. Post-Training gradient curation for one model, selected by a `RegularizerSpec`."""

    def __init__(self, model: nn.Module, spec: RegularizerSpec,
                 shard_sum: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.model, self.spec = model, spec
        self.shard_sum = shard_sum or (lambda t: t)  # SUM over the ranks that shard the parameters
        self.feasible = FEASIBLE_SETS.get(spec.feasible_set)
        self.granularity = self.feasible.granularity(spec)
        self.blocks = find_blocks(model, spec.hook_embeddings, spec.exclude)
        for b in self.blocks:
            b.on_backward = self._on_backward
        hooked = {id(p) for b in self.blocks for p in b.params()}
        self.unhooked = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in hooked]
        self.device = self.blocks[0].weight.device if self.blocks else torch.device("cpu")
        # Blocks whose weights are sharded (FSDP): the sharded parameters, kept because inside a
        # backward the module holds the all-gathered ones instead.
        self._sharded = {b: {"weight": b.weight, "bias": b.bias} for b in self.blocks if _is_dtensor(b.weight)}
        self._use_sketch = spec.kernel == "sketch" and self.granularity is not Granularity.TARGET
        self._factors: dict[Block, K.SketchFactors] = {}
        self.targets: dict[Block, K.Target] = {}
        self.unhooked_targets: dict[str, torch.Tensor] = {}
        self.captured = False
        self._pass: _Pass | None = None
        self._remove_hooks = install(self.blocks)
        self._merged_handles = self._install_merged_row_split()

    # --------------------------------------------------------------------------------------------
    # public API

    def needs_refresh(self, step: int) -> bool:
        """True when the target gradient should be (re)captured at this step; `full` never needs it."""
        if not self.feasible.uses_target:
            return False
        return not self.captured or step % self.spec.refresh_every == 0

    def capture_target(self, loss: torch.Tensor, accumulate: bool = False) -> float:
        """Backward `loss` (the target loss, normalised over the *whole* target batch) into the cache.

        Weight gradients are not touched. Chunks of one target batch accumulate with
        accumulate=True (each chunk's loss divided by the total target token count).
        Returns the seconds spent.
        """
        t0 = time.perf_counter()
        if not accumulate:
            self.targets.clear()
            self.unhooked_targets.clear()
        with self._in_pass(_Pass(mode="capture")), self._unhooked_grads(keep=False) as fresh:
            loss.backward()
        if self.granularity is Granularity.TARGET:
            for name, g in fresh.items():
                prev = self.unhooked_targets.get(name)
                self.unhooked_targets[name] = g if prev is None else prev + g
        self.captured = True
        return time.perf_counter() - t0

    def backward(self, loss_fn: LossFn | torch.Tensor, units: torch.Tensor, n_target_rows: int = 0,
                 loss_scale: float = 1.0, reduce_grads: Callable[[], None] | None = None) -> RegStats:
        """Run the regularized backward of one (micro-)batch; hooked weights get curated `.grad`.

        Data parallel: `loss_scale` multiplies the loss, hence every gradient this backward produces
        (the rank's share of the global normaliser, before a SUM over ranks); scores are divided by
        it again, so selection and the reported scores see the unscaled loss. `target_only` writes
        the cached g_T, which is already the global target gradient, and ignores it. `reduce_grads`
        (the SUM over ranks) runs after the backward and before the metrics, so the cosines describe
        the update every rank applies.
        """
        t0 = time.perf_counter()
        units = self._units(units)
        self._check_call(n_target_rows, units)
        if n_target_rows and not callable(loss_fn):
            raise TypeError("merged target mode needs loss_fn(rows) -> loss: target rows are split during the forward")
        if loss_scale != 1.0:
            loss_fn = _scaled(loss_fn, loss_scale)
        p = self._new_pass(units, n_target_rows)
        p.score_scale /= loss_scale
        if self.granularity is Granularity.TARGET:
            self._write_target_grads()
        elif self.granularity is Granularity.NONE and not n_target_rows:
            _call(loss_fn, None).backward()
        elif self.granularity is Granularity.GLOBAL and self.spec.passes == "two_pass":
            self._two_pass(loss_fn, p)
        else:
            p.mode = "layer" if self.granularity in (Granularity.LAYER, Granularity.NONE) else "retain"
            with self._in_pass(p), self._unhooked_grads(scale=p.normaliser / _sum(p.units[: p.n_train])
                                                        if n_target_rows else 1.0):
                _call(loss_fn, None).backward()
            if p.mode == "retain":
                self._assemble_global(p)
        if reduce_grads is not None and self.granularity is not Granularity.TARGET:
            reduce_grads()
        self._cosine_metrics(p)
        p.stats.seconds = time.perf_counter() - t0
        return p.stats

    def score(self, loss: LossFn | torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """Global scores s_i = sum_l <G_i^l, g_T^l> of one batch; no parameter gradient changes."""
        p = self._new_pass(self._units(units), 0)
        p.mode = "score"
        with self._in_pass(p), self._unhooked_grads(keep=False):
            _call(loss, None).backward()
        return p.scores

    def filter_buffer(self, chunks: Iterable[tuple[LossFn | torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """IIF: score a whole buffer once (in chunks), return the indices the subset rule keeps."""
        scores = torch.cat([self.score(loss, units) for loss, units in chunks])
        return torch.nonzero(subset_weights(scores, self.spec)).flatten()

    def target_cache(self) -> list[torch.Tensor]:
        """The cached target tensors that still need a SUM over data-parallel ranks, in a fixed order
        (the same on every rank). Sharded ones are left out: they were reduce-scattered already
        (hooked layers here, unhooked parameters by FSDP)."""
        out = []
        for b in self.blocks:
            if b in self.targets:
                parts = self.targets[b].parts()
                out += [parts[k] for k in sorted(parts)]
        out += [self.unhooked_targets[k] for k in sorted(self.unhooked_targets)]
        return [t for t in out if not _is_dtensor(t)]

    def state_dict(self) -> dict:
        """The cached target gradient, by block name (for exact resume between refreshes); full
        tensors (a collective when parameters are sharded: call it on every rank)."""
        return {
            "captured": self.captured,
            "targets": {b.name: t.map(lambda k, v: _full(v)).parts() for b, t in self.targets.items()},
            "unhooked_targets": {k: _full(v) for k, v in self.unhooked_targets.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` (tensors may come from another device, e.g. a checkpoint read on CPU)."""
        by_name = {b.name: b for b in self.blocks}
        params = dict(self.unhooked)
        self.targets = {by_name[n]: K.Target(**t).map(
                            lambda k, v, b=by_name[n]: self._shard_like(b, k, v.to(self.device)))
                        for n, t in state["targets"].items()}
        self.unhooked_targets = {k: _like(v.to(self.device), params[k]) for k, v in state["unhooked_targets"].items()}
        self.captured = state["captured"]

    def remove(self) -> None:
        """Restore the model's original forwards."""
        self._remove_hooks()
        for h in self._merged_handles:
            h.remove()

    # --------------------------------------------------------------------------------------------
    # the per-layer backward

    def _on_backward(self, block: Block, dy: torch.Tensor, x: torch.Tensor) -> bool:
        p = self._pass
        if p is None:
            return False
        if p.mode == "capture":
            self._accumulate_target(block,
                                    self._target_from(block, dy.reshape(-1, dy.shape[-1])[None], _rows3(x, 1, block)))
            return True
        n = p.n_rows
        if dy.shape[0] != n:
            raise RuntimeError(
                f"hooked layer {block.name!r} saw a leading dimension of {dy.shape[0]} but the batch has "
                f"{n} examples; hooked layers need inputs shaped (examples, ..., features)"
            )
        dy, x = dy.reshape(n, -1, dy.shape[-1]), _rows3(x, n, block)
        target = self._layer_target(block, dy, x, p)
        dy, x = dy[: p.n_train], x[: p.n_train]
        if p.mode == "layer" and self.granularity is Granularity.NONE:
            pi = torch.ones(p.n_train, dtype=torch.float64, device=dy.device)
        else:
            t0 = time.perf_counter()
            s = self._scores(block, dy, x, target).to(torch.float64) * p.score_scale
            p.stats.score_seconds += time.perf_counter() - t0
            p.stats.scores[block.name] = s.detach().cpu()
            if p.mode in ("score", "retain"):
                p.scores = s if p.scores is None else p.scores + s
                if p.mode == "retain":
                    p.retained[block] = (dy, x)
                return True
            pi = membership(s, self.spec)
        self._write_grad(block, dy, x, pi, p)
        return True

    def _layer_target(self, block, dy, x, p: _Pass):
        if p.n_target:
            t = self._target_from(block, dy[p.n_train :], x[p.n_train :])
            p.merged_targets[block] = t
            return t
        if not self.captured:
            raise RuntimeError("no target gradient captured: call Regularizer.capture_target() before backward()")
        t = self.targets.get(block)
        if block in self._sharded and t is not None:
            return t.map(lambda k, v: _full(v))  # a sketch is never sharded: _full leaves it as it is
        return t

    def _scores(self, block: Block, dy, x, target) -> torch.Tensor:
        if target is None:  # the target loss never reached this block: g_T^l = 0
            return dy.new_zeros(dy.shape[0])
        if block.kind is BlockKind.EMBEDDING:
            return K.embedding_scores(dy, x, target, block.module.padding_idx)
        if self._use_sketch:
            return K.sketch_scores(dy, x, target, self._sketch_factors(block), block.bias is not None)
        out_dim, in_dim = block.shape
        kernel = K.choose_kernel(self.spec.kernel, dy.shape[1], out_dim, in_dim)
        if kernel == "direct":
            return K.direct_scores(dy, x, target, self.spec.direct_chunk)
        return K.ghost_scores(dy, x, target)

    def _target_from(self, block: Block, dy, x):
        """Target representation (summed over the given rows) in the space the kernel scores in."""
        if block.kind is BlockKind.EMBEDDING:
            return K.Target(weight=K.embedding_target(dy, x, block.module.num_embeddings, block.module.padding_idx))
        if self._use_sketch:
            return K.sketch_target(dy, x, self._sketch_factors(block), block.bias is not None)
        return K.linear_target(dy, x, block.bias is not None)

    def _accumulate_target(self, block: Block, t: K.Target) -> None:
        if block in self._sharded:  # SUM over ranks, keep our rows
            t = t.map(lambda k, v: self._reduce_scatter(block, k, v))
        prev = self.targets.get(block)
        if prev is None:
            self.targets[block] = t
        else:
            prev.add_(t)

    def _write_grad(self, block: Block, dy, x, pi: torch.Tensor, p: _Pass) -> None:
        omega = example_weights(pi, p.units[: p.n_train], p.normaliser)
        p.stats.kept[block.name] = kept_fraction(pi)
        p.stats.weights[block.name] = omega.detach().cpu()
        if block.kind is BlockKind.EMBEDDING:
            gw, gb = K.assemble_embedding(dy, x, omega, block.module.num_embeddings, block.module.padding_idx), None
        else:
            gw, gb = K.assemble_linear(dy, x, omega, block.bias is not None)
        _accumulate_grad(block.weight, gw)
        if gb is not None:
            _accumulate_grad(block.bias, gb)

    # --------------------------------------------------------------------------------------------
    # global subsets

    def _select_global(self, p: _Pass) -> torch.Tensor:
        pi = membership(p.scores, self.spec)
        p.stats.global_scores = p.scores.detach().cpu()
        p.stats.empty = bool((pi * p.units[: p.n_train]).sum() <= 0)
        return pi

    @torch.no_grad()
    def _assemble_global(self, p: _Pass) -> None:
        """One-pass: the retained (dY, X) of every block, weighted by the one global choice."""
        if p.scores is None:
            return
        pi = self._select_global(p)
        for block, (dy, x) in p.retained.items():
            self._write_grad(block, dy, x, pi, p)
        p.retained.clear()

    def _two_pass(self, loss_fn: LossFn | torch.Tensor, p: _Pass) -> None:
        """Pass 1 scores only; pass 2 is a plain backward of the loss over the selected rows."""
        if not callable(loss_fn):
            raise TypeError("global_subset two_pass needs loss_fn(rows) -> loss, not a precomputed loss tensor")
        p.mode = "score"
        with self._in_pass(p), self._unhooked_grads(keep=False):
            loss_fn(None).backward()
        pi = self._select_global(p)
        for b in self.blocks:
            p.stats.kept[b.name] = kept_fraction(pi)
        rows = torch.nonzero(pi).flatten()
        if rows.numel() == 0:
            # A zero backward all the same: under FSDP the other ranks' backwards wait on this one's
            # collectives. Parameters it does not reach get zeros too.
            (loss_fn(None) * 0.0).backward()
            for prm in self.model.parameters():
                if prm.requires_grad:
                    _accumulate_grad(prm, torch.zeros_like(prm))
            return
        loss_fn(rows.to(p.units.device)).backward()

    # --------------------------------------------------------------------------------------------
    # target-only, metrics, helpers

    def _write_target_grads(self) -> None:
        if not self.captured:
            raise RuntimeError("no target gradient captured: call Regularizer.capture_target() before backward()")
        for b in self.blocks:
            if b in self.targets:
                for part, g in self.targets[b].parts().items():  # weight (and bias): target_only is never sketched
                    _accumulate_grad(getattr(b, part), g.clone())
        for name, prm in self.unhooked:
            if name in self.unhooked_targets:
                _accumulate_grad(prm, self.unhooked_targets[name].clone())

    @torch.no_grad()
    def _cosine_metrics(self, p: _Pass) -> None:
        """cos(update, g_T) per hooked block and overall, from `.grad` (sketched space for sketch).

        Built from summands so that sharded parameters need two SUMs over ranks in all: per block,
        (<d, g>, |d|^2, |g|^2) over this rank's rows when rows are disjoint (full g_T, or a sketch
        without an output factor), or this rank's part of P1^T [W | b] P2 when the output factor
        mixes rows (summed before its norms). Unsharded, every summand is the whole thing.
        """
        disjoint, mixed = {}, {}
        for b in self.blocks:
            t = p.merged_targets.get(b) if p.n_target else self.targets.get(b)
            if t is None or b.weight.grad is None:
                continue
            d_w = _local(b.weight.grad)
            d_b = _local(b.bias.grad) if b.bias is not None and b.bias.grad is not None else None
            if t.sketch is not None:
                f = self._sketch_factors(b)
                if f.p_out is not None:
                    mixed[b.name] = (f.project_grad(d_w, d_b, p_out=_rows(f.p_out, b.weight)), t.sketch)
                    continue
                pairs = [(f.project_grad(d_w, d_b), _rows(t.sketch, b.weight))]
            else:
                pairs = ([(d_w, _rows(t.weight, b.weight))]
                         + ([(d_b, _rows(t.bias, b.bias))] if t.bias is not None else []))
            disjoint[b.name] = torch.stack([sum((d * g).sum() for d, g in pairs), sum((d * d).sum() for d, _ in pairs),
                                            sum((g * g).sum() for _, g in pairs)]).double()
        parts = dict(zip(disjoint, self.shard_sum(torch.stack(list(disjoint.values()))))) if disjoint else {}
        if mixed:
            summed = self.shard_sum(torch.cat([d.reshape(-1) for d, _ in mixed.values()]))
            offset = 0
            for name, (d, g) in mixed.items():
                d, offset = summed[offset : offset + d.numel()].view_as(d), offset + d.numel()
                parts[name] = torch.stack([(d * g).sum(), (d * d).sum(), (g * g).sum()]).double()
        dot_all = nd_all = nt_all = 0.0
        for b in self.blocks:  # block order, as before
            if b.name not in parts:
                continue
            dot, nd, nt = (float(v) for v in parts[b.name])
            if nd > 0 and nt > 0:
                p.stats.cos[b.name] = dot / (nd * nt) ** 0.5
            dot_all, nd_all, nt_all = dot_all + dot, nd_all + nd, nt_all + nt
        if nd_all > 0 and nt_all > 0:
            p.stats.cos_overall = dot_all / (nd_all * nt_all) ** 0.5
        if self.granularity in (Granularity.NONE, Granularity.TARGET) and not p.stats.kept:
            p.stats.kept = {b.name: 1.0 for b in self.blocks} if self.granularity is Granularity.NONE else {}

    def _reduce_scatter(self, block: Block, part: str, t: torch.Tensor) -> torch.Tensor:
        """SUM every rank's full `t` and keep this rank's rows, laid out like the block's `part`. A
        sketch has no such parameter: it stays whole, all-reduced by the caller (`target_cache`)."""
        prm = self._sharded[block].get(part)
        if prm is None:
            return t
        mesh = prm.device_mesh
        return DTensor.from_local(t, mesh, [Partial()] * mesh.ndim).redistribute(mesh, prm.placements)

    def _shard_like(self, block: Block, part: str, t: torch.Tensor) -> torch.Tensor:
        """A full cached tensor laid out like the block's `part` when the block is sharded."""
        prm = self._sharded.get(block, {}).get(part)
        return t if prm is None else _like(t, prm)

    def _sketch_factors(self, block: Block) -> K.SketchFactors:
        f = self._factors.get(block)
        if f is None:
            out_dim, in_dim = block.shape
            w = block.weight
            f = K.SketchFactors.for_block(out_dim, in_dim, block.bias is not None,
                                          block.index, self.spec.sketch, w.dtype, w.device)
            self._factors[block] = f
        return f

    def _units(self, units: torch.Tensor) -> torch.Tensor:
        return units.detach().to(device=self.device, dtype=torch.float64).flatten()

    def _new_pass(self, units: torch.Tensor, n_target: int) -> _Pass:
        p = _Pass(mode="layer", units=units, n_target=n_target, normaliser=_sum(units))
        if n_target:
            t_train, t_val = _sum(units[:-n_target]), _sum(units[-n_target:])
            p.score_scale = p.normaliser**2 / (t_train * t_val)
        return p

    def _check_call(self, n_target_rows: int, units: torch.Tensor) -> None:
        merged = self.spec.target_mode == "merged"
        if merged and n_target_rows <= 0:
            raise ValueError("regularizer.target_mode is 'merged': pass n_target_rows > 0 (target rows "
                             "last in the batch)")
        if not merged and n_target_rows:
            raise ValueError("n_target_rows given but regularizer.target_mode is 'separate'")
        if n_target_rows >= units.numel():
            raise ValueError(f"n_target_rows={n_target_rows} leaves no general rows in a batch of {units.numel()}")

    @contextmanager
    def _in_pass(self, p: _Pass):
        if self._pass is not None:
            raise RuntimeError("Regularizer passes cannot nest")
        self._pass = p
        try:
            yield p
        finally:
            self._pass = None

    @contextmanager
    def _unhooked_grads(self, keep: bool = True, scale: float = 1.0):
        """Isolate the unhooked parameters' gradient contribution of the enclosed backward.

        keep=False discards it (score / capture passes) and yields it by name; keep=True adds it,
        times `scale`, to whatever `.grad` held before.
        """
        saved = [prm.grad for _, prm in self.unhooked]
        for _, prm in self.unhooked:
            prm.grad = None
        fresh: dict[str, torch.Tensor] = {}
        try:
            yield fresh
        finally:
            for (name, prm), old in zip(self.unhooked, saved):
                new = prm.grad
                if new is not None:
                    fresh[name] = new
                prm.grad = old
                if keep and new is not None:
                    _accumulate_grad(prm, new * scale if scale != 1.0 else new)

    def _install_merged_row_split(self) -> list:
        """Forward hooks that keep target rows out of unhooked weights' gradients in merged mode."""
        unhooked_ids = {id(prm) for _, prm in self.unhooked}
        handles = []
        for m in self.model.modules():
            own = dict(m.named_parameters(recurse=False))
            if own and any(id(prm) in unhooked_ids for prm in own.values()):
                handles.append(m.register_forward_hook(self._row_split_hook, with_kwargs=True))
        return handles

    def _row_split_hook(self, module, args, kwargs, out):
        p = self._pass
        if p is None or not p.n_target:
            return out
        if not isinstance(out, torch.Tensor) or out.shape[0] != p.n_rows:
            raise RuntimeError(f"merged target mode: cannot split rows of {type(module).__name__} output")
        detached = {n: prm.detach() for n, prm in module.named_parameters(recurse=False)}

        def target_rows(x):  # a batch-shaped input, cut to the target rows: only those are recomputed
            return x[p.n_train :] if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == p.n_rows else x

        with _hooks_paused(self):
            out_det = torch.func.functional_call(module, detached, tuple(map(target_rows, args)),
                                                 {k: target_rows(v) for k, v in kwargs.items()})
        return torch.cat([out[: p.n_train], out_det])


@contextmanager
def _hooks_paused(reg: Regularizer):
    # functional_call re-enters forward hooks; keep our own hook from recursing.
    p, reg._pass = reg._pass, None
    try:
        yield
    finally:
        reg._pass = p


def _rows3(x: torch.Tensor, n: int, block: Block) -> torch.Tensor:
    """Reshape a hooked input to (n, T, features); embedding ids to (n, T)."""
    if block.kind is BlockKind.EMBEDDING:
        return x.reshape(n, -1)
    return x.reshape(n, -1, x.shape[-1])


def _call(loss: LossFn | torch.Tensor, rows) -> torch.Tensor:
    return loss(rows) if callable(loss) else loss


def _scaled(loss: LossFn | torch.Tensor, c: float) -> LossFn | torch.Tensor:
    return (lambda rows: c * loss(rows)) if callable(loss) else c * loss


def _sum(t: torch.Tensor) -> float:
    return float(t.sum())


def _is_dtensor(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a sharded tensor (the tensor itself when unsharded)."""
    return t.to_local() if _is_dtensor(t) else t


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole of a sharded tensor (an all-gather: every rank must call it)."""
    return t.full_tensor() if _is_dtensor(t) else t


def _like(full: torch.Tensor, prm: torch.Tensor) -> torch.Tensor:
    """A full tensor laid out like `prm`: sharded the same way when prm is a DTensor. Every rank
    holds the same `full`, so each keeps its own rows without communicating (src_data_rank=None)."""
    if not _is_dtensor(prm) or _is_dtensor(full):
        return full
    return distribute_tensor(full, prm.device_mesh, prm.placements, src_data_rank=None)


def _rows(full: torch.Tensor, prm: torch.Tensor) -> torch.Tensor:
    """This rank's rows of `full` for the sharded parameter `prm` (full itself when unsharded)."""
    return _local(_like(full, prm))


def _accumulate_grad(prm: nn.Parameter, g: torch.Tensor) -> None:
    g = _like(g.to(device=prm.device, dtype=prm.dtype), prm)
    if prm.grad is None:
        prm.grad = g
    else:
        prm.grad += g
