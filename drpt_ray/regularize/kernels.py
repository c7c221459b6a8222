"""Score kernels: per-example inner products s_i = <G_i, G_T> without per-example backward passes.

Inside a hooked Linear's backward we hold, for every example i, the output gradient dY_i (T, O)
and the input X_i (T, I). Example i's weight gradient is G_i = dY_i^T X_i (bias: the column sum of
dY_i, i.e. X with a ones column appended). Shapes below: dy (n, T, O), x (n, T, I).

- `ghost` (exact): s_i = sum_t dY_it . (G_T x_it). One weight-gradient-sized matmul for the whole
  batch; memory of one activation-sized tensor (we contract over the smaller of O and I).
- `direct` (exact): materialise G_i in chunks of examples, s_i = <vec G_i, vec G_T>. Memory
  chunk * O * I; wins over ghost in memory once T > sqrt(O I) (method.md 3.2).
- `sketch` (unbiased estimate): factorised Kronecker sketch. With random P1 (O, k) and P2 (I, k)
  whose entries have variance 1/k, sketch(G) = P1^T G P2 and E<sketch(G_i), sketch(G_T)> = <G_i, G_T>.
  Computed as a ghost product in the sketched space: (dY_i P1) S_T (X_i P2)^T, never forming G_i.
  A factor whose k >= its dimension is the identity (exact in that factor).
- Embeddings: s_i = sum_t dY_it . G_T[token_it] (gather-dot), always exact.

A *target representation* (`Target`) is whatever the kernel scores against: the full (O, I) gradient
(+bias) for ghost/direct, the (k1, k2) sketch for sketch, the (V, D) gradient for an embedding.
`linear_target`, `sketch_target` and `embedding_target` build it from (dy, x) rows, which serves
both target capture and merged-batch mode; captures accumulate by addition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from drpt_ray.config import SketchSpec


@dataclass
class Target:
    """One block's target gradient g_T (summed over the target rows) in the space its kernel scores in.

    One of three forms: a Linear scored by ghost/direct has `weight` (O, I) and `bias` (O,) or None;
    an embedding has `weight` (V, D); a sketched Linear has only `sketch` (k1, k2), its bias folded
    into the second factor. `weight` and `bias` are named like the parameters they are gradients of.
    """

    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    sketch: torch.Tensor | None = None

    def parts(self) -> dict[str, torch.Tensor]:
        """The tensors it holds, by name ("weight", "bias", "sketch")."""
        return {k: v for k, v in vars(self).items() if v is not None}

    def map(self, fn) -> "Target":
        """The same form with fn(part name, tensor) applied to each part."""
        return Target(**{k: fn(k, v) for k, v in self.parts().items()})

    def add_(self, other: "Target") -> None:
        for k, v in self.parts().items():
            v += getattr(other, k)


# ------------------------------------------------------------------------------------------------
# Sketch factors


def sketch_factor(dim: int, k: int, kind: str, seed: int, dtype, device) -> torch.Tensor | None:
    """A (dim, k) random factor with entries of variance 1/k, or None (identity) when k >= dim."""
    if k >= dim:
        return None
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "gaussian":
        p = torch.randn(dim, k, generator=gen, dtype=torch.float64)
    else:
        p = torch.randint(0, 2, (dim, k), generator=gen).to(torch.float64) * 2 - 1
    return (p / math.sqrt(k)).to(device=device, dtype=dtype)


@dataclass
class SketchFactors:
    """P1 for the output side (O, k1) and P2 for the input side (I + has_bias, k2); None = identity."""

    p_out: torch.Tensor | None
    p_in: torch.Tensor | None

    @classmethod
    def for_block(cls, out_dim: int, in_dim: int, has_bias: bool, index: int, spec: SketchSpec, dtype, device):
        # Seeds follow method.md 3.3: base + 1e4 * module index, +1 for the second factor.
        base = spec.seed + 10_000 * index
        return cls(
            p_out=sketch_factor(out_dim, spec.dim, spec.kind, base, dtype, device),
            p_in=sketch_factor(in_dim + int(has_bias), spec.dim, spec.kind, base + 1, dtype, device),
        )

    def project_dy(self, dy: torch.Tensor) -> torch.Tensor:
        return dy if self.p_out is None else dy @ self.p_out

    def project_x(self, x: torch.Tensor, has_bias: bool) -> torch.Tensor:
        if has_bias:
            x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
        return x if self.p_in is None else x @ self.p_in

    def project_grad(self, weight: torch.Tensor, bias: torch.Tensor | None,
                     p_out: torch.Tensor | None = None) -> torch.Tensor:
        """P1^T [W | b] P2: the sketch of a full gradient (used for the cosine metric). Given rows of
        [W | b] and the matching rows `p_out` of P1, it is those rows' summand of the sketch."""
        g = weight if bias is None else torch.cat([weight, bias[:, None]], dim=1)
        p_out = self.p_out if p_out is None else p_out
        if p_out is not None:
            g = p_out.T @ g
        if self.p_in is not None:
            g = g @ self.p_in
        return g


# ------------------------------------------------------------------------------------------------
# Linear kernels. All take dy (n, T, O) and x (n, T, I).


def ghost_scores(dy: torch.Tensor, x: torch.Tensor, target: Target) -> torch.Tensor:
    """Exact s_i = sum_t dY_it . (W_T x_it + b_T), contracting through the smaller of O and I."""
    out_dim, in_dim = target.weight.shape
    if in_dim <= out_dim:
        s = ((dy @ target.weight) * x).sum(dim=(1, 2))
    else:
        s = ((x @ target.weight.T) * dy).sum(dim=(1, 2))
    if target.bias is not None:
        s = s + (dy.sum(dim=1) * target.bias).sum(dim=1)
    return s


def per_example_grads(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """G_i = dY_i^T X_i for every example: (n, O, I)."""
    return torch.bmm(dy.transpose(1, 2), x)


def direct_scores(dy: torch.Tensor, x: torch.Tensor, target: Target, chunk: int) -> torch.Tensor:
    """Exact s_i = <G_i, G_T> with G_i materialised `chunk` examples at a time."""
    parts = []
    for lo in range(0, dy.shape[0], chunk):
        g = per_example_grads(dy[lo : lo + chunk], x[lo : lo + chunk])
        parts.append((g * target.weight).sum(dim=(1, 2)))
    s = torch.cat(parts)
    if target.bias is not None:
        s = s + (dy.sum(dim=1) * target.bias).sum(dim=1)
    return s


def sketch_scores(dy: torch.Tensor, x: torch.Tensor, target: Target, factors: SketchFactors, has_bias: bool):
    """Unbiased s_i ~ <P1^T G_i P2, S_T>, a ghost product in the sketched space."""
    a = factors.project_dy(dy)  # (n, T, k1)
    b = factors.project_x(x, has_bias)  # (n, T, k2)
    return ((a @ target.sketch) * b).sum(dim=(1, 2))


def linear_target(dy: torch.Tensor, x: torch.Tensor, has_bias: bool) -> Target:
    """Summed gradient of the given rows: sum_i dY_i^T X_i (and sum of dY for the bias)."""
    o, i = dy.shape[-1], x.shape[-1]
    weight = dy.reshape(-1, o).T @ x.reshape(-1, i)
    bias = dy.reshape(-1, o).sum(dim=0) if has_bias else None
    return Target(weight, bias)


def sketch_target(dy: torch.Tensor, x: torch.Tensor, factors: SketchFactors, has_bias: bool) -> Target:
    a = factors.project_dy(dy)
    b = factors.project_x(x, has_bias)
    return Target(sketch=a.reshape(-1, a.shape[-1]).T @ b.reshape(-1, b.shape[-1]))


def assemble_linear(dy: torch.Tensor, x: torch.Tensor, omega: torch.Tensor, has_bias: bool):
    """sum_i omega_i G_i as (weight grad, bias grad), touching only rows with omega_i != 0."""
    rows = torch.nonzero(omega).flatten()
    if rows.numel() < omega.numel():
        dy, x, omega = dy[rows], x[rows], omega[rows]
    weighted = dy * omega.to(dy.dtype)[:, None, None]
    g = linear_target(weighted, x, has_bias)
    return g.weight, g.bias


# ------------------------------------------------------------------------------------------------
# Embedding kernels. dy (n, T, D), ids (n, T); padding_idx rows never get gradient.


def _mask_padding(dy: torch.Tensor, ids: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
    if padding_idx is None:
        return dy
    return dy * (ids != padding_idx).to(dy.dtype)[..., None]


def embedding_scores(dy: torch.Tensor, ids: torch.Tensor, target: Target, padding_idx: int | None):
    """Exact gather-dot s_i = sum_t dY_it . G_T[token_it]."""
    dy = _mask_padding(dy, ids, padding_idx)
    return (dy * target.weight[ids]).sum(dim=(1, 2))


def embedding_target(dy: torch.Tensor, ids: torch.Tensor, num_embeddings: int, padding_idx: int | None):
    """Scatter-add of the given rows' output gradients into a (V, D) gradient."""
    dy = _mask_padding(dy, ids, padding_idx)
    g = dy.new_zeros(num_embeddings, dy.shape[-1])
    return g.index_add_(0, ids.reshape(-1), dy.reshape(-1, dy.shape[-1]))


def assemble_embedding(dy, ids, omega, num_embeddings: int, padding_idx: int | None):
    return embedding_target(dy * omega.to(dy.dtype)[:, None, None], ids, num_embeddings, padding_idx)


def choose_kernel(requested: str, tokens: int, out_dim: int, in_dim: int) -> str:
    """`auto`: ghost while its activation-sized buffer is smaller than one per-example gradient,
    i.e. T < sqrt(O * I) (method.md 3.2's T* crossover, per layer); direct beyond."""
    if requested != "auto":
        return requested
    return "ghost" if tokens < math.sqrt(out_dim * in_dim) else "direct"
