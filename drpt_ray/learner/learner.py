"""The Learner: policy (+reference, +critic), optimizer and the Dr. regularizer, for every mode.

A plain class, so SFT runs it in-process and RL runs the same class on every rank of a Ray Train
worker group (`drpt_ray.learner.group.LearnerGroup`; N = 1 is one rank). The trainer talks to
either directly through `LearnerAPI` (drpt_ray/learner/api.py).

Data parallel (`self.comm`, drpt_ray/learner/collective.py; identities when world_size == 1): each
rank holds a shard of every batch. Global statistics: the target loss is normalised by the global
token (unit) count and the reward standardisation of the `reward` objective uses the global target
batch, and the per-layer target cache is SUM all-reduced, so every rank holds g_T of the global
target batch (method.md 1.3, oracle 12). Scoring and selection stay local (each rank's general
shard against that global g_T). Every rank multiplies its loss by its share of the global
normaliser units (`loss_scale`), so a SUM of the ranks' gradients is the update: an explicit
all-reduce before clipping, or, with `resources.fsdp`, FSDP's own reduce-scatter inside the
backward (drpt_ray/learner/fsdp.py). group.py's docstring says why there is no DDP reducer.

Device: the learner computes on `learner_device(spec)` (the worker's CUDA device when the job
reserves learner GPUs, else CPU); batches come in on CPU and results go back on CPU.

One RL update (method.md 1.4, 4.3): `capture_target` backs the target objective into the
regularizer's per-layer cache; `rl_step` runs the regularized backward of the full policy loss
(clipped surrogate + KL loss + value loss) of the general rollouts, so the curated gradient
replaces the batch gradient before clipping and AdamW. The value head is not a hooked block (it
sees every row), as in the paper's RLHF setup; the trunk under it is curated like any other
hooked layer because the value loss flows through it.

The target objective (`algorithm.target_objective`) is a registry entry, drpt_ray/algorithms/target.py;
docs/target-objectives.md has their definitions and why `token_pg` is the default.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import ray
import torch
from torch import nn

from drpt_ray.algorithms import (
    ADVANTAGE_ESTIMATORS,
    POLICY_LOSSES,
    PolicyLossInputs,
    aggregate,
    example_units,
    kl_loss,
    token_entropy,
    value_loss,
)
from drpt_ray.algorithms.aggregation import masked_mean
from drpt_ray.algorithms.target import TARGET_OBJECTIVES, TargetInputs, standardised_rewards
from drpt_ray.config import JobSpec
from drpt_ray.data import supervised_token_counts
from drpt_ray.learner.fsdp import (
    full_model_state,
    full_optimizer_state,
    load_full_model_state,
    load_full_optimizer_state,
    shard_policy,
)
from drpt_ray.learner.batch import RLBatch, cat_rl
from drpt_ray.learner.collective import Collective
from drpt_ray.learner.optim import make_optimizer
from drpt_ray.lm_losses import concat_rows, next_token_logprobs, sequence_loss_sums, token_logprobs, token_mean_loss
from drpt_ray.models import load_model
from drpt_ray.regularize import Regularizer
from drpt_ray.rollout.sync import AdapterWeights

EVAL_LOGITS_BUDGET = 2**27  # floats of logits per eval_sft forward


def kept_advantage_mean(weights: dict[str, torch.Tensor], batch: RLBatch) -> float:
    """Mean sequence advantage of the rows each hooked layer trained on (weighted by its example
    weights), averaged over layers. Group-relative advantages sum to zero over a group, so the
    full batch gives 0 and the shared directions of the responses (emitting EOS, the answer's
    punctuation) cancel; a selection that drifts from 0 trains those shared directions one way."""
    mask = batch.response_mask.cpu()
    seq_adv = ((batch.advantages.cpu() * mask).sum(1) / mask.sum(1).clamp(min=1)).double()
    means = [float((w * seq_adv).sum() / w.sum()) for w in weights.values()
             if w.numel() == seq_adv.numel() and w.sum() > 0]
    return sum(means) / len(means) if means else 0.0


def learner_device(spec: JobSpec) -> torch.device:
    """CUDA when the job reserves learner GPUs (Ray Train sets each worker's current device), else CPU."""
    if spec.resources.learner_num_gpus <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("resources.learner_num_gpus > 0 but the learner process sees no CUDA device "
                           f"(torch {torch.__version__}; a CPU-only build, or no GPU on this node)")
    return torch.device("cuda", torch.cuda.current_device())


def to_device(batch, device: torch.device):
    """A tokenized batch (dict) or an RLBatch on `device` (None stays None)."""
    if batch is None:
        return None
    if isinstance(batch, RLBatch):
        return batch.to(device)
    return {k: v.to(device) for k, v in batch.items()}


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full weights under plain Hugging Face names (what vLLM loads). LoRA deltas are merged in
    out of place (W + scale * B A), so the trained model is never modified."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):
        return {k: v.detach() for k, v in model.state_dict().items()}
    base = model.get_base_model()
    merged = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            w = module.get_base_layer().weight.detach()
            for adapter in module.active_adapters:
                w = w + module.get_delta_weight(adapter).detach()
            merged[f"{name}.weight"] = w
    out = {}
    for k, v in base.state_dict().items():
        if "lora_" in k:
            continue
        key = k.replace(".base_layer", "")
        out[key] = merged.get(key, v.detach())
    return out


class ReferencePolicy:
    """The frozen policy the KL term measures against: under LoRA the policy with its adapters
    disabled (the base weights, no second copy), else a frozen copy of the policy.

    It is the policy RL starts from: the loaded model, or the model after the warm start (`reset`),
    as verl and OpenRLHF take the SFT model as the reference. A reference left at the weights
    before the warm start (random ones for the tiny models) pulls the policy towards them: in the
    RLHF bench the KL to it was ~4.4 nats at step 1 and its gradient drove the token entropy
    towards uniform (measured before this was fixed).
    """

    def __init__(self, policy: nn.Module, lora: bool):
        self.lora = lora
        self.model = policy if lora else copy.deepcopy(policy).eval().requires_grad_(False)

    @torch.no_grad()
    def reset(self, policy: nn.Module) -> None:
        """Make the current `policy` the reference. Under LoRA each adapter's update is folded into
        its base weight and the adapter's B is zeroed: the policy is unchanged, and with the
        adapters disabled it is now the current policy too (the checkpoint holds the base weights,
        so a resume restores this). Otherwise the frozen copy takes the policy's weights."""
        if self.lora:
            from peft.tuners.lora import LoraLayer

            for m in policy.modules():
                if isinstance(m, LoraLayer):
                    for name in m.active_adapters:
                        if name in m.lora_A:
                            m.get_base_layer().weight += m.get_delta_weight(name)
                            m.lora_B[name].weight.zero_()
        else:
            for r, p in zip(self.model.parameters(), policy.parameters(), strict=True):
                r.copy_(p)

    @property
    def own_module(self) -> nn.Module | None:
        """The copy this object owns (None under LoRA, where the model is the policy itself)."""
        return None if self.lora else self.model

    def logprobs(self, batch: RLBatch) -> torch.Tensor:
        with self.model.disable_adapter() if self.lora else nullcontext():
            return token_logprobs(self.model, batch.input_ids, batch.attention_mask)


class Learner:
    """Owns the trained model and everything that updates it."""

    def __init__(self, spec: JobSpec):
        torch.manual_seed(spec.seed)
        self.spec = spec
        self.comm = Collective()
        self.device = learner_device(spec)
        self.fsdp = spec.resources.fsdp
        if self.comm.world_size != spec.resources.learner_num_workers:  # the spec's layout checks assume it
            raise RuntimeError(f"this learner runs in a world of {self.comm.world_size} ranks but the spec asks for "
                               f"resources.learner_num_workers={spec.resources.learner_num_workers}")
        self.policy, self.tokenizer = load_model(spec.model, spec.output_dir)
        self.policy.train()
        if spec.model.gradient_checkpointing:
            # Non-reentrant: the recomputed forward runs the regularizer's hooked layers again, and
            # their backward sees the same (dY, X) as without recomputation (tested bit for bit).
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Under FSDP the full model stays on the host: fully_shard moves one unit at a time to the
        # device and keeps only its shard there, so a model that does not fit one device still loads.
        home = torch.device("cpu") if self.fsdp else self.device
        self.policy.to(home)
        alg = spec.algorithm
        rl = spec.mode != "sft"
        self.value_head = None
        if rl and ADVANTAGE_ESTIMATORS.meta(alg.advantage).needs_critic:
            base = self.policy.get_base_model() if hasattr(self.policy, "get_base_model") else self.policy
            hidden = base.config.hidden_size
            self.value_head = nn.Linear(hidden, 1).to(dtype=getattr(torch, spec.model.dtype), device=home)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        # Every rank starts from rank 0's weights, as DDP does. Not under FSDP: every rank read the
        # same files, and one flat buffer of the whole model may not fit a device.
        if not self.fsdp:
            self.comm.broadcast_(self._state_tensors())
        self.ref = ReferencePolicy(self.policy, spec.model.lora is not None) if rl and alg.kl_coef > 0 else None
        if self.fsdp:
            for m in self._modules():
                shard_policy(m, self.device)
        # What the optimizer updates, by name (the checkpoint's optimizer state is keyed by these names).
        critic = {"value_head": self.value_head} if self.value_head is not None else {}
        self.trained = nn.ModuleDict({"policy": self.policy, **critic})
        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad]}]
        if self.value_head is not None:
            groups.append({"params": list(self.value_head.parameters()), "lr": alg.critic_lr})
        self.opt_steps_total = spec.steps * (alg.ppo_epochs if rl else 1)
        self.opt, self.sched = make_optimizer(groups, spec.optim, self.opt_steps_total)
        self.reg = Regularizer(self.policy, spec.regularizer, shard_sum=self.comm.sum if self.fsdp else None)
        self._merged_target: RLBatch | None = None  # merged mode: capture_target's rows, for the next rl_step
        self.updates = 0
        # Dr. GRPO's constant normaliser is the longest response the rollouts may produce.
        self.max_new_tokens = spec.rollout.sampling.max_new_tokens

    # ------------------------------------------------------------------------------------------
    # SFT

    def sft_step(self, general: dict, target: dict | None) -> dict:
        """One regularized SFT step (token-mean CE on response tokens); returns its metrics."""
        t0 = time.perf_counter()
        general, target = to_device(general, self.device), to_device(target, self.device)
        self.opt.zero_grad(set_to_none=True)
        metrics: dict = {}
        if self.spec.regularizer.target_mode == "merged":
            rows_batch, n_target = concat_rows(general, target), target["input_ids"].shape[0]
        else:
            rows_batch, n_target = general, 0
            if target is not None:
                c0 = time.perf_counter()
                sums, counts = sequence_loss_sums(self.policy, target)
                loss_t = sums.sum() / self.comm.sum(counts.sum()).clamp(min=1)  # global token-mean's local part
                self.reg.capture_target(loss_t)
                self._reduce_target()
                metrics.update({"target_loss": float(self.comm.sum(loss_t.detach())),
                                "time/regularize": time.perf_counter() - c0})
        seen: dict = {}

        def loss_fn(rows):
            loss = token_mean_loss(self.policy, rows_batch, rows)
            if rows is None:
                seen["loss"] = float(loss.detach())
            return loss

        units = supervised_token_counts(rows_batch["labels"])
        share = self._share(units[: units.numel() - n_target])
        stats = self._backward(loss_fn, units, share, n_target_rows=n_target)
        # target_only never evaluates the general batch's loss (its update is g_T): no "loss" then
        metrics.update(seen, **self._optimizer_step(), **stats.summary())
        self._global_mean(metrics, share)
        metrics["time/update"] = time.perf_counter() - t0 - metrics.get("time/regularize", 0.0)
        return metrics

    def warm_start(self, batches: list[dict], lr: float) -> float:
        """Plain SFT (no curation, its own AdamW at constant `lr`) before RL; returns the last loss.
        The result becomes the KL reference (`ReferencePolicy.reset`)."""
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr)
        loss, share = torch.tensor(float("nan")), 1.0
        for batch in batches:
            batch = to_device(batch, self.device)
            opt.zero_grad(set_to_none=True)
            share = self._share(supervised_token_counts(batch["labels"]))
            loss = token_mean_loss(self.policy, batch)
            (loss * share if share != 1.0 else loss).backward()  # no regularized pass in flight: ordinary gradients
            self._reduce_grads(params)
            _clip(params, 1.0)
            opt.step()
        opt.zero_grad(set_to_none=True)
        if self.ref is not None:
            self.ref.reset(self.policy)
        if self.comm.active:
            loss = self.comm.sum(loss.detach() * share)
        return float(loss.detach())

    def eval_sft(self, batch: dict | None) -> float | None:
        """Token-mean loss over every supervised token of `batch` (None: this rank has no rows)."""
        n = 0 if batch is None else batch["input_ids"].shape[0]
        # Rows per forward: the logits (rows x T x vocab) dominate the memory; ~0.5 GB of fp32 at most.
        vocab = self.policy.get_output_embeddings().weight.shape[0]
        chunk = 1 if not n else max(1, EVAL_LOGITS_BUDGET // (batch["input_ids"].shape[1] * vocab))
        starts = list(range(0, n, chunk))
        # Under FSDP every forward is a collective: match the rank with the most chunks.
        joins = self.comm.max(len(starts)) - len(starts) if self.fsdp else 0
        total = tokens = 0.0
        with self._inference():
            for lo in starts:
                b = to_device({k: v[lo : lo + chunk] for k, v in batch.items()}, self.device)
                count = float(supervised_token_counts(b["labels"]).sum())
                total += float(token_mean_loss(self.policy, b)) * count
                tokens += count
            for _ in range(joins):
                self._join_forward()
        return total / max(tokens, 1.0) if n else None

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy answers of the current policy to `prompts` (transformers' generate, left padding)."""
        tok = self.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        try:
            enc = to_device(dict(tok(prompts, return_tensors="pt", padding=True)), self.device)
        finally:
            tok.padding_side = side
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with self._inference():
            out = self.policy.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad)
        return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    # ------------------------------------------------------------------------------------------
    # RL

    def score_rollouts(self, batch: RLBatch | None) -> RLBatch | None:
        """The logprob phase: behaviour log-probs (learner recompute), reference log-probs, values.
        (None: this rank has no rows; under FSDP it still joins the forwards.)"""
        if batch is None and not self.fsdp:
            return None
        b = (batch if batch is not None else self._placeholder_batch()).to(self.device)
        with self._inference():
            b.old_logprobs, b.values, _ = self._forward(b)
            if self.ref is not None:
                b.ref_logprobs = self.ref.logprobs(b)
        return b.to("cpu") if batch is not None else None

    def capture_target(self, batch: RLBatch | None) -> dict:
        """Hand the target rollouts to the regularizer. Separate target mode: back their objective
        into its per-layer cache now. Merged mode: keep the rows for the next `rl_step`, whose one
        forward and backward takes g_T from them (Regularizer, merged batch).

        Data parallel: `batch` is this rank's shard (None: no target rows on this rank this time;
        it still joins the collectives with a zero contribution). Token counts and the reward
        standardisation are global, and the cache is SUM all-reduced afterwards.
        """
        if not self.reg.feasible.uses_target:
            return {}
        if self.spec.regularizer.target_mode == "merged":  # one learner worker (config): batch is every target row
            self._merged_target = batch.to(self.device)
            return {}
        n_rows = 0 if batch is None else batch.size
        batch = (batch if batch is not None else self._placeholder_batch()).to(self.device)
        logp, _, _ = self._forward(batch)
        loss = self._target_objective(batch, logp, n_rows)
        self.reg.capture_target(loss)
        self._reduce_target()
        return {"target/objective": float(self.comm.sum(loss.detach()))}

    def rl_step(self, batch: RLBatch) -> dict:
        """`ppo_epochs` regularized optimizer steps on one rollout batch; returns metrics.

        Merged target mode: the target rows of `capture_target` join every epoch's forward and
        backward, after the general rows; the loss is (U_g L_general + U_t L_target) / (U_g + U_t),
        U_g the general rows' aggregation units and U_t the target rows' response tokens, so each
        layer's g_T, scores and curated gradient equal separate mode's at the same weights
        (Regularizer: merged batch). With ppo_epochs > 1, g_T then follows the weights every epoch
        where separate mode keeps the one captured at the step's start."""
        batch = batch.to(self.device)
        metrics: dict = {}
        target, self._merged_target = self._merged_target, None
        if self.spec.regularizer.target_mode == "merged" and self.reg.feasible.uses_target and target is None:
            raise RuntimeError("regularizer.target_mode 'merged': capture_target(target rows) must come before rl_step")
        if self.reg.feasible.filters_buffer:
            batch, kept = self._iif_filter(batch)
            metrics["reg/iif_kept_frac"] = kept
        units = example_units(batch.response_mask, self.spec.algorithm.loss_agg, self.max_new_tokens)
        share = self._share(units)
        n, n_target = batch.size, 0
        if target is not None:
            merged, n_target = cat_rl([batch, target]), target.size
            general_rows, target_rows = torch.arange(n), torch.arange(n, n + n_target)
            target_units = target.response_mask.sum(1).clamp(min=1)  # any positive units do: only their sum is used
            u_g, u_t = float(units.sum()), float(target_units.sum())
            units = torch.cat([units, target_units.to(units)])
        for _ in range(self.spec.algorithm.ppo_epochs):
            self.opt.zero_grad(set_to_none=True)
            seen: dict = {}

            def loss_fn(rows):
                if target is None or rows is not None:  # rows: general rows only (a two-pass second pass)
                    b = batch.rows(rows)
                    logp, values, entropy = self._forward(b, entropy=True)
                    total, parts = self._rl_loss(b, logp, values, entropy)
                else:
                    logp, values, entropy = self._forward(merged, entropy=True)
                    g = general_rows
                    g_values = values[g] if values is not None else None
                    total, parts = self._rl_loss(merged.rows(g), logp[g], g_values, entropy[g])
                    objective = self._target_objective(merged.rows(target_rows), logp[target_rows], n_target)
                    parts["target/objective"] = float(objective.detach())
                    total = (u_g * total + u_t * objective) / (u_g + u_t)
                if rows is None:
                    seen.update(parts)
                return total

            stats = self._backward(loss_fn, units, share, n_target_rows=n_target)
            metrics.update(seen)
            metrics.update(self._optimizer_step())
            metrics.update(stats.summary())
            if stats.weights:
                metrics["reg/kept_adv_mean"] = kept_advantage_mean(stats.weights, batch)
        self._global_mean(metrics, share)
        return metrics

    def needs_target(self, step: int) -> bool:
        """Whether this step must bring target data (a refresh, or merged mode's in-batch rows)."""
        return self.spec.regularizer.target_mode == "merged" or self.reg.needs_refresh(step)

    def weights(self) -> dict[str, torch.Tensor] | AdapterWeights:
        """Full weights under HF names, on CPU, for the rollout workers: complete on rank 0 only
        (under FSDP every rank joins gathering them; data parallel, the other ranks copy nothing).
        With `rollout.lora_adapter_sync`, the LoRA adapter alone."""
        if self.fsdp:
            return full_model_state(self.policy)
        if self.comm.rank != 0:
            return {}
        if self.spec.rollout.lora_adapter_sync:
            from peft import get_peft_model_state_dict

            config = self.policy.peft_config["default"].to_dict()
            tensors = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.policy).items()}
            return AdapterWeights(tensors, config)
        return {k: v.cpu() for k, v in hf_state_dict(self.policy).items()}

    def weights_ref(self) -> ray.ObjectRef | None:
        """`weights()` in the object store, so only a reference travels to the rollout workers
        (rank 0's; None on the other ranks, which under FSDP still join gathering them)."""
        weights = self.weights()
        return ray.put(weights) if self.comm.rank == 0 else None

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def save(self, path: str) -> None:
        """Everything needed for an exact resume: weights, optimizer, schedule, RNG, update count.

        One file, written by rank 0 and read by every rank. Full (unsharded) tensors on CPU, keyed
        by parameter name, so a checkpoint of N data-parallel or FSDP workers loads into any other
        layout. Data parallel, every rank holds the same state; under FSDP gathering it is a
        collective, so every rank calls save.
        """
        if self.comm.rank != 0 and not self.fsdp:  # data parallel: rank 0 holds the same state
            return
        state = {
            "model": full_model_state(self.trained),
            "opt": full_optimizer_state(self.trained, self.opt),
            "sched": self.sched.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if self.device.type == "cuda" else None,
            "updates": self.updates,
            "regularizer": self.reg.state_dict(),
            # a frozen copy may differ from the loaded model (the warm start resets it)
            "reference": full_model_state(self.ref.own_module) if self.ref and self.ref.own_module else None,
        }
        if self.comm.rank == 0:
            torch.save(state, Path(path) / "learner.pt")

    def load(self, path: str) -> None:
        state = torch.load(Path(path) / "learner.pt", weights_only=False, map_location="cpu")
        load_full_model_state(self.trained, state["model"])
        load_full_optimizer_state(self.trained, self.opt, state["opt"])
        self.sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"])
        self.updates = state["updates"]
        self.reg.load_state_dict(state["regularizer"])
        if state.get("reference") is not None:  # checkpoints before the reference was saved lack it
            load_full_model_state(self.ref.own_module, state["reference"])

    def save_model(self, path: str) -> str:
        """The final model (adapters for LoRA) and tokenizer, loadable with from_pretrained (rank 0
        writes; under FSDP every rank joins gathering the weights)."""
        weights = full_model_state(self.policy) if self.fsdp else None
        if self.comm.rank == 0:
            self.policy.save_pretrained(path, state_dict=weights)
            self.tokenizer.save_pretrained(path)
        return path

    def remove(self) -> None:
        self.reg.remove()

    # ------------------------------------------------------------------------------------------
    # internals

    def _backward(self, loss_fn, units: torch.Tensor, share: float, n_target_rows: int = 0):
        """The regularized backward of this rank's `share` of the global loss, then the SUM over ranks."""
        params = [p for g in self.opt.param_groups for p in g["params"]]
        return self.reg.backward(loss_fn, units, n_target_rows=n_target_rows, loss_scale=share,
                                 reduce_grads=lambda: self._reduce_grads(params))

    def _reduce_grads(self, params: list[nn.Parameter]) -> None:
        """SUM the ranks' (share-scaled) gradients; FSDP has already done it inside the backward."""
        if not self.fsdp:
            self.comm.sum_grads(params)

    def _optimizer_step(self) -> dict:
        """Clip, AdamW, schedule (the gradients are already the group's)."""
        params = [p for g in self.opt.param_groups for p in g["params"]]
        clip = self.spec.optim.max_grad_norm if self.spec.optim.max_grad_norm is not None else float("inf")
        grad_norm = _clip(params, clip)
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        self.updates += 1
        return {"grad_norm": grad_norm, "lr": lr}

    # ------------------------------------------------------------------------------------------
    # data parallel (all identities in one process)

    def _share(self, units: torch.Tensor) -> float:
        """This rank's share of the global normaliser units (1.0 in one process)."""
        if not self.comm.active:
            return 1.0
        local = units.detach().double().sum()
        return float(local) / max(float(self.comm.sum(local)), 1e-300)

    def _reduce_target(self) -> None:
        """SUM all-reduce the per-layer target cache: every rank then holds g_T of the global batch
        (under FSDP, its rows of it: the sharded parts were reduce-scattered during the capture)."""
        if not self.comm.active:
            return
        tensors = self.reg.target_cache()
        self.comm.check_same(sum(t.numel() for t in tensors), "the size of the target-gradient cache")
        self.comm.sum_(tensors)

    def _global_mean(self, metrics: dict, share: float) -> None:
        """Loss-like metrics become the global (share-weighted) mean; the rest stay this rank's."""
        if not self.comm.active:
            return
        keys = sorted(k for k in metrics
                      if k == "loss" or k.startswith("loss/") or k in ("clip_frac", "approx_kl", "policy/entropy"))
        vals = self.comm.sum(torch.tensor([float(metrics[k]) * share for k in keys], dtype=torch.float64))
        metrics.update({k: float(v) for k, v in zip(keys, vals)})

    def _modules(self) -> list[nn.Module]:
        """The modules this learner runs forwards of: policy, frozen reference copy, value head."""
        return [m for m in (self.policy, self.ref.own_module if self.ref else None, self.value_head) if m is not None]

    def _state_tensors(self) -> list[torch.Tensor]:
        mods = [self.policy] + ([self.value_head] if self.value_head is not None else [])
        return [t for m in mods for t in list(m.parameters()) + list(m.buffers())]

    @contextmanager
    def _inference(self):
        """no_grad and eval mode for forwards without a backward. Under FSDP the root units reshard
        afterwards: a root keeps its all-gathered weights after a forward, expecting the backward,
        and a later training step would otherwise run on those stale copies (measured: wrong
        gradients after an eval)."""
        was_training = self.policy.training
        self.policy.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.policy.train(was_training)
            if self.fsdp:
                for m in self._modules():
                    m.reshard()

    def _join_forward(self) -> None:
        """A throwaway forward: under FSDP a rank with nothing left to do still joins the all-gathers."""
        self.policy(input_ids=torch.zeros(1, 2, dtype=torch.long, device=self.device), use_cache=False)

    def _placeholder_batch(self) -> RLBatch:
        """One fully masked row: a rank without target rows still runs the (zero) target backward."""
        return RLBatch(
            input_ids=torch.zeros(1, 2, dtype=torch.long), attention_mask=torch.ones(1, 2, dtype=torch.long),
            response_mask=torch.zeros(1, 1), rewards=torch.zeros(1), group_ids=torch.zeros(1, dtype=torch.long),
            advantages=torch.zeros(1, 1),
        )

    def _forward(self, batch: RLBatch,
                 entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Log-probs of every next token (n, L-1); with a critic, values (n, L-1); with `entropy`, the
        policy's entropy at every position (n, L-1), differentiable only when the loss has a bonus."""
        out = self.policy(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            use_cache=False,
            output_hidden_states=self.value_head is not None,
        )
        logp = next_token_logprobs(out.logits, batch.input_ids)
        values = None
        if self.value_head is not None:
            values = self.value_head(out.hidden_states[-1][:, :-1]).squeeze(-1)
        ent = None
        if entropy:
            logits = out.logits[:, :-1]
            ent = token_entropy(logits if self.spec.algorithm.entropy_coef > 0 else logits.detach())
        return logp, values, ent

    def _policy_loss(self, b: RLBatch, logp: torch.Tensor):
        alg = self.spec.algorithm
        old = b.old_logprobs if b.old_logprobs is not None else logp.detach()
        return POLICY_LOSSES.get(alg.policy_loss)(
            PolicyLossInputs(
                logprobs=logp, old_logprobs=old, advantages=b.advantages, response_mask=b.response_mask,
                clip_eps=alg.clip_eps, clip_eps_high=alg.clip_eps_high, agg=alg.loss_agg, max_len=self.max_new_tokens,
            )
        )

    def _target_objective(self, batch: RLBatch, logp: torch.Tensor, n_rows: int) -> torch.Tensor:
        """`algorithm.target_objective` of target rows: a token mean over the global target batch
        (this rank's `n_rows` of it; 0 with a placeholder row)."""
        mask = batch.response_mask
        tokens = self.comm.sum(mask.sum()).clamp(min=1)
        name = self.spec.algorithm.target_objective
        z = None
        if TARGET_OBJECTIVES.meta(name).standardised_rewards:  # over the global target batch
            rewards, offset = self.comm.gather_cat(batch.rewards[:n_rows])
            z = standardised_rewards(rewards)[offset : offset + n_rows] if n_rows else logp.new_zeros(1)

        def train_loss() -> torch.Tensor:
            loss = self._policy_loss(batch, logp).loss
            if self.comm.active:  # this rank's part of the global aggregate
                units = (example_units(mask, self.spec.algorithm.loss_agg, self.max_new_tokens) if n_rows
                         else torch.zeros(1))
                loss = loss * self._share(units)
            return loss

        return TARGET_OBJECTIVES.get(name)(TargetInputs(logp, mask, batch.advantages, tokens, z, train_loss))

    def _rl_loss(self, b: RLBatch, logp: torch.Tensor, values: torch.Tensor | None,
                 entropy: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Policy loss - entropy bonus + KL loss + value loss of a (sub-)batch, each normalised over its own rows."""
        alg = self.spec.algorithm
        pl = self._policy_loss(b, logp)
        total = pl.loss
        parts = {"loss/policy": float(pl.loss.detach()), "clip_frac": pl.clip_frac, "approx_kl": pl.approx_kl,
                 "policy/entropy": masked_mean(entropy, b.response_mask)}
        if alg.entropy_coef > 0:
            total = total - alg.entropy_coef * aggregate(entropy, b.response_mask, alg.loss_agg, self.max_new_tokens)
        if b.ref_logprobs is not None and not alg.kl_in_reward:
            kl = kl_loss(logp, b.ref_logprobs, b.response_mask, kind=alg.kl_estimator, agg=alg.loss_agg,
                         max_len=self.max_new_tokens)
            total = total + alg.kl_coef * kl
            parts["loss/kl"] = float(kl.detach())
        if values is not None:
            vl = value_loss(values, b.values, b.returns, b.response_mask, clip=alg.clip_eps, agg=alg.loss_agg,
                            max_len=self.max_new_tokens)
            total = total + alg.vf_coef * vl.loss
            parts["loss/value"] = float(vl.loss.detach())
        parts["loss"] = float(total.detach())
        return total, parts

    def _iif_filter(self, batch: RLBatch) -> tuple[RLBatch, float]:
        """IIF (method.md 2.3): score the whole buffer once with the advantage-weighted
        per-sample token-mean log-prob, keep the subset rule's rows, train on them plainly."""

        def score_loss(rows):
            b = batch.rows(rows)
            logp, _, _ = self._forward(b)
            per_ex = -(b.advantages * logp * b.response_mask).sum(1) / b.response_mask.sum(1).clamp(min=1)
            return per_ex.sum() / b.size

        kept = self.reg.filter_buffer([(score_loss, torch.ones(batch.size))])
        return batch.rows(kept), kept.numel() / batch.size


def _clip(params: list[nn.Parameter], max_norm: float) -> float:
    """clip_grad_norm_ that also takes FSDP's sharded gradients; returns the total norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

