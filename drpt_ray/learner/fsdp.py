"""FSDP for the learner (`resources.fsdp`): torch's fully_shard (FSDP2) over the learner ranks.

What is sharded: every transformer block (the classes in the HF model's `_no_split_modules`),
then the rest of the policy as the root unit; the reference policy the same way; the value head
as a unit of its own. Parameters become DTensors sharded on dim 0 (rows); the forward and the
backward all-gather one unit at a time.

How the Dr. regularizer fits (drpt_ray/regularize/hooks.py): a hooked Linear runs inside its
unit's forward, so it sees the all-gathered weight, the full activations X and, in backward, the
full dY of its rank's rows. Scoring needs only (dY, X) and the cached g_T, never the sharded
weight, and the curated gradient is written into the *unsharded* parameter's `.grad`, which FSDP
then reduce-scatters like any autograd gradient. So the selection is exactly the data-parallel
one (local per rank against the global g_T; drpt_ray/learner/group.py).

The target cache is sharded like the weights (drpt_ray/regularize/regularizer.py): each layer's
g_T is reduce-scattered as the capture backward reaches it, and all-gathered one layer at a time
when a backward scores against it. So a rank holds 1/N of the cache, plus one layer's full g_T
while it scores that layer, the same pattern as FSDP's own weight all-gathers (and the same
extra volume per regularized backward for the hooked layers). `kernel: sketch` caches k x k
sketches instead, which are small and stay whole.

Gradient reduction is a SUM (divide factor 1): every rank has already multiplied its loss by its
share of the global normaliser (`Regularizer.backward(loss_scale=...)`), so the SUM is the
share-weighted average of the data-parallel learner, bit for bit the same formula.

Not supported with FSDP (the JobSpec is rejected, naming the field): LoRA (the merged export
reads the adapters module by module), `target_mode: merged` (its row split calls modules with
detached local parameters), and global one-pass selection (it writes gradients after the
backward, when FSDP has already reduced); two-pass global selection works.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

# Full (unsharded) state on CPU: the checkpoint format is the same with and without FSDP.
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Optimizer state may lack entries for parameters that never had a gradient (AdamW creates them
# lazily), exactly as torch.optim.Optimizer.load_state_dict allows.
FULL_LOAD = StateDictOptions(full_state_dict=True, strict=False)


def shard_policy(model: nn.Module, device: torch.device) -> None:
    """fully_shard each transformer block, then the model as the root unit (in place)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # FSDP warns that an output view modified in place would skip its pre-backward hook; the learner
    # never modifies model outputs in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    block_classes = set(getattr(model, "_no_split_modules", None) or [])
    units = [m for m in model.modules() if type(m).__name__ in block_classes]
    for m in units + [model]:
        fully_shard(m, mesh=mesh)
        m.set_gradient_divide_factor(1.0)  # SUM: the ranks' losses are already share-scaled
        m.set_force_sum_reduction_for_comms(True)  # a plain SUM collective (gloo has no PREMUL_SUM)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full weights under the model's own names, on CPU (a collective under FSDP: call on every rank;
    the result is complete on rank 0)."""
    return get_model_state_dict(model, options=FULL)


def load_full_model_state(model: nn.Module, state: dict) -> None:
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(modules: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter name (a collective under FSDP, like full_model_state)."""
    return get_optimizer_state_dict(modules, opt, options=FULL)


def load_full_optimizer_state(modules: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(modules, opt, optim_state_dict=state, options=FULL_LOAD)
