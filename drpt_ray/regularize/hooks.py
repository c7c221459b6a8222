"""Layer hooks: a custom autograd function per trainable Linear/Embedding that sees (dY, X) in backward.

The hooked module's forward is swapped for one that routes through `_HookedLinear` (or
`_HookedEmbedding`). What happens to the weight gradient is decided at *backward* time, so a loss
computed before the Regularizer is asked to curate it still works: inside a regularized pass,
`Block.on_backward` scores, selects and writes the curated `.grad` itself; outside one, the
function returns the ordinary weight gradient to autograd (a plain backward, same cost). Either
way grad_input = dY W is returned for the *whole* batch, so curation never changes upstream
gradient flow (method.md 1.4 step 2).

Which modules are hooked: every `nn.Linear` whose weight requires grad (this includes peft's
`lora_A`/`lora_B`, which are separate blocks, while the frozen base layer is skipped), and
`nn.Embedding` when asked. A weight shared by two modules (tied embeddings/lm_head) is never
hooked: one parameter cannot belong to two blocks with different selections; it keeps ordinary
gradients. `exclude` substrings opt modules out by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class BlockKind(Enum):
    LINEAR = "linear"
    EMBEDDING = "embedding"


@dataclass(eq=False)
class Block:
    """One hooked weight matrix: the unit of layer-wise selection."""

    name: str
    module: nn.Module
    kind: BlockKind
    index: int  # position in model.named_modules(), seeds its sketch factors
    # Called in backward with (block, dY, X); returns True when it took care of the weight gradient,
    # False to let autograd receive the ordinary one (no regularized pass in flight).
    on_backward: Callable[["Block", torch.Tensor, torch.Tensor], bool] = field(repr=False, default=None)

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return getattr(self.module, "bias", None) if self.kind is BlockKind.LINEAR else None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def params(self) -> list[nn.Parameter]:
        return [p for p in (self.weight, self.bias) if p is not None]


class _HookedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, block):
        ctx.save_for_backward(x, weight)
        ctx.block, ctx.has_bias = block, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        grad_x = dy @ weight if ctx.needs_input_grad[0] else None
        if ctx.block.on_backward(ctx.block, dy, x):
            return grad_x, None, None, None
        # No regularized pass in flight: the ordinary weight gradient, through autograd.
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        return grad_x, dy2.T @ x2, dy2.sum(0) if ctx.has_bias else None, None


class _HookedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, block):
        ctx.save_for_backward(ids)
        ctx.block = block
        return F.embedding(ids, weight, block.module.padding_idx)

    @staticmethod
    def backward(ctx, dy):
        (ids,) = ctx.saved_tensors
        if ctx.block.on_backward(ctx.block, dy, ids):
            return None, None, None
        m = ctx.block.module
        g = dy.new_zeros(m.num_embeddings, dy.shape[-1]).index_add_(0, ids.reshape(-1), dy.reshape(-1, dy.shape[-1]))
        if m.padding_idx is not None:
            g[m.padding_idx] = 0
        return None, g, None


def _linear_forward(block: Block):
    m = block.module

    def forward(x):
        return _HookedLinear.apply(x, m.weight, m.bias, block)

    return forward


def _embedding_forward(block: Block):
    def forward(ids):
        return _HookedEmbedding.apply(ids, block.module.weight, block)

    return forward


def find_blocks(model: nn.Module, hook_embeddings: bool, exclude: list[str]) -> list[Block]:
    """The hookable blocks of `model`, in named_modules order."""
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    blocks = []
    for index, (name, m) in enumerate(model.named_modules()):
        if any(s in name for s in exclude):
            continue
        if type(m) is nn.Linear:
            kind = BlockKind.LINEAR
        elif type(m) is nn.Embedding and hook_embeddings:
            kind = BlockKind.EMBEDDING
        else:
            continue
        if not m.weight.requires_grad or owners[id(m.weight)] > 1:
            continue
        if kind is BlockKind.EMBEDDING and (m.sparse or m.max_norm is not None or m.scale_grad_by_freq):
            continue  # their gradients are not the plain scatter-add the kernel assumes
        blocks.append(Block(name=name, module=m, kind=kind, index=index))
    return blocks


def install(blocks: list[Block]) -> Callable[[], None]:
    """Route each block's forward through its hooked function; returns a function that undoes it."""
    for b in blocks:
        b.module.forward = _linear_forward(b) if b.kind is BlockKind.LINEAR else _embedding_forward(b)

    def remove() -> None:
        for b in blocks:
            del b.module.forward  # falls back to the class's forward

    return remove
