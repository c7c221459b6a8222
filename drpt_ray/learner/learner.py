"""The Learner: policy (+reference, +critic), optimizer and the Dr. regularizer, for every mode.

A plain class, so SFT runs it in-process and RL runs the same class on every rank of a Ray Train
worker group (`drpt_ray.learner.group.LearnerGroup`; N = 1 is one rank). The trainer talks to
either through `drpt_ray.trainer.call`.

Data parallel (`self.comm`, drpt_ray/learner/collective.py; identities when world_size == 1): each
rank holds a shard of every batch. Global statistics: the target loss is normalised by the global
token (unit) count and the reward standardisation of the `reward` objective uses the global target
batch, and the per-layer target cache is SUM all-reduced, so every rank holds g_T of the global
target batch (method.md 1.3, oracle 12). Scoring and selection stay local (each rank's general
shard against that global g_T), then every gradient is weighted by the rank's share of the
global normaliser units and SUM all-reduced before clipping; group.py's docstring says why.

One RL update (method.md 1.4, 4.3): `capture_target` backs the target objective into the
regularizer's per-layer cache; `rl_step` runs the regularized backward of the full policy loss
(clipped surrogate + KL loss + value loss) of the general rollouts, so the curated gradient
replaces the batch gradient before clipping and AdamW. The value head is not a hooked block (it
sees every row), as in the paper's RLHF setup; the trunk under it is curated like any other
hooked layer because the value loss flows through it.

Target objectives (`algorithm.target_objective`, method.md 3.4 / 4.3), all token-means over the
target batch's response tokens:
- `reward` (default): L_T = -sum_i z_i sum_t log pi(y_it) / T with z = batch-standardised rewards
  (r - mean) / (std + 1e-8); if std < 1e-6 or there is one sample, z = r - 0.5 instead (the
  zero-variance guard: a binary-reward baseline, so g_T is never silently zero);
- `token_pg`: L_T = -sum_{i,t} A_it log pi(y_it) / T with the batch's advantages;
- `train_loss`: the configured policy loss itself at ratio 1.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import ray
import torch
from torch import nn

from drpt_ray.algorithms import (
    POLICY_LOSSES,
    PolicyLossInputs,
    example_units,
    kl_loss,
    value_loss,
)
from drpt_ray.config import ADVANTAGES_NEEDING_CRITIC, JobSpec
from drpt_ray.data import supervised_token_counts
from drpt_ray.learner.batch import RLBatch
from drpt_ray.learner.collective import Collective
from drpt_ray.learner.optim import make_optimizer
from drpt_ray.losses import sequence_loss_sums, token_mean_loss
from drpt_ray.models import load_model
from drpt_ray.regularize import Regularizer

ZERO_VARIANCE_STD = 1e-6


def standardised_rewards(rewards: torch.Tensor) -> torch.Tensor:
    """(r - mean) / (std + 1e-8), or r - 0.5 when the batch has no variance (the zero-variance guard)."""
    r = rewards.double()
    if r.numel() < 2 or r.std() < ZERO_VARIANCE_STD:
        return r - 0.5
    return (r - r.mean()) / (r.std() + 1e-8)


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


class Learner:
    """Owns the trained model and everything that updates it."""

    def __init__(self, spec: JobSpec):
        torch.manual_seed(spec.seed)
        self.spec = spec
        self.policy, self.tokenizer = load_model(spec.model, spec.output_dir)
        self.policy.train()
        alg = spec.algorithm
        rl = spec.mode != "sft"
        self.ref = self._reference() if rl and alg.kl_coef > 0 else None
        self.value_head = None
        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad]}]
        if rl and alg.advantage in ADVANTAGES_NEEDING_CRITIC:
            hidden = self.policy.config.hidden_size if not hasattr(self.policy, "get_base_model") else self.policy.get_base_model().config.hidden_size
            self.value_head = nn.Linear(hidden, 1).to(dtype=getattr(torch, spec.model.dtype))
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
            groups.append({"params": list(self.value_head.parameters()), "lr": alg.critic_lr})
        self.opt_steps_total = spec.steps * (alg.ppo_epochs if rl else 1)
        self.opt, self.sched = make_optimizer(groups, spec.optim, self.opt_steps_total)
        self.reg = Regularizer(self.policy, spec.regularizer)
        self.updates = 0
        self.comm = Collective()
        if self.comm.active:
            if spec.regularizer.target_mode == "merged":
                raise ValueError("regularizer.target_mode 'merged' needs one learner worker; use 'separate' with resources.learner_num_workers > 1")
            self.comm.broadcast_(self._state_tensors())  # every rank starts from rank 0's weights, as DDP does

    # ------------------------------------------------------------------------------------------
    # SFT

    def sft_step(self, general: dict, target: dict | None) -> dict:
        """One regularized SFT step (token-mean CE on response tokens); returns its metrics."""
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        metrics: dict = {}
        if self.spec.regularizer.target_mode == "merged":
            rows_batch, n_target = _concat_rows(general, target), target["input_ids"].shape[0]
        else:
            rows_batch, n_target = general, 0
            if target is not None:
                c0 = time.perf_counter()
                sums, counts = sequence_loss_sums(self.policy, target)
                loss_t = sums.sum() / self.comm.sum(counts.sum()).clamp(min=1)  # global token-mean's local part
                self.reg.capture_target(loss_t)
                self._reduce_target()
                metrics.update({"target_loss": float(self.comm.sum(loss_t.detach())), "time/regularize": time.perf_counter() - c0})
        seen: dict = {}

        def loss_fn(rows):
            loss = token_mean_loss(self.policy, rows_batch, rows)
            if rows is None:
                seen["loss"] = float(loss.detach())
            return loss

        units = supervised_token_counts(rows_batch["labels"])
        share = self._share(units[: units.numel() - n_target])
        stats = self.reg.backward(loss_fn, units, n_target_rows=n_target)
        metrics.update(loss=seen.get("loss", float("nan")), **self._optimizer_step(share), **stats.summary())
        self._global_mean(metrics, share)
        metrics["time/update"] = time.perf_counter() - t0 - metrics.get("time/regularize", 0.0)
        return metrics

    def warm_start(self, batches: list[dict], lr: float) -> float:
        """Plain SFT (no curation, its own AdamW at constant `lr`) before RL; returns the last loss."""
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr)
        loss, share = torch.tensor(float("nan")), 1.0
        for batch in batches:
            opt.zero_grad(set_to_none=True)
            loss = token_mean_loss(self.policy, batch)
            loss.backward()  # no regularized pass in flight: hooked layers give ordinary gradients
            share = self._share(supervised_token_counts(batch["labels"]))
            self.comm.average_grads(params, share)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        opt.zero_grad(set_to_none=True)
        if self.comm.active:
            loss = self.comm.sum(loss.detach() * share)
        return float(loss.detach())

    @torch.no_grad()
    def eval_sft(self, batch: dict, chunk: int = 64) -> float:
        """Token-mean loss over every supervised token of `batch`."""
        was_training = self.policy.training
        self.policy.eval()
        n = batch["input_ids"].shape[0]
        total = tokens = 0.0
        for lo in range(0, n, chunk):
            rows = torch.arange(lo, min(n, lo + chunk))
            count = float(supervised_token_counts(batch["labels"][rows]).sum())
            total += float(token_mean_loss(self.policy, batch, rows)) * count
            tokens += count
        self.policy.train(was_training)
        return total / max(tokens, 1.0)

    # ------------------------------------------------------------------------------------------
    # RL

    @torch.no_grad()
    def score_rollouts(self, batch: RLBatch) -> RLBatch:
        """The logprob phase: behaviour log-probs (learner recompute), reference log-probs, values."""
        was_training = self.policy.training
        self.policy.eval()
        batch.old_logprobs, values = self._forward(batch)
        batch.values = values
        if self.ref is not None:
            batch.ref_logprobs = self._ref_logprobs(batch)
        self.policy.train(was_training)
        return batch

    def capture_target(self, batch: RLBatch | None) -> dict:
        """Back the target objective of `batch` (target rollouts) into the regularizer's cache.

        Data parallel: `batch` is this rank's shard (None: no target rows on this rank this time;
        it still joins the collectives with a zero contribution). Token counts and the reward
        standardisation are global, and the cache is SUM all-reduced afterwards.
        """
        if self.spec.regularizer.feasible_set == "full":
            return {}
        t0 = time.perf_counter()
        n_rows = 0 if batch is None else batch.size
        batch = batch if batch is not None else self._placeholder_batch()
        logp, _ = self._forward(batch)
        mask = batch.response_mask
        tokens = self.comm.sum(mask.sum()).clamp(min=1)
        objective = self.spec.algorithm.target_objective
        if objective == "reward":
            rewards, offset = self.comm.gather_cat(batch.rewards[:n_rows])
            z = standardised_rewards(rewards)[offset : offset + n_rows] if n_rows else torch.zeros(1)
            loss = -(z.to(logp.dtype)[:, None] * logp * mask).sum() / tokens
        elif objective == "token_pg":
            loss = -(batch.advantages * logp * mask).sum() / tokens
        else:
            loss = self._policy_loss(batch, logp).loss
            if self.comm.active:  # this rank's part of the global aggregate
                units = example_units(mask, self.spec.algorithm.loss_agg) if n_rows else torch.zeros(1)
                loss = loss * self._share(units)
        self.reg.capture_target(loss)
        self._reduce_target()
        return {"target/objective": float(self.comm.sum(loss.detach())), "time/regularize": time.perf_counter() - t0}

    def rl_step(self, batch: RLBatch) -> dict:
        """`ppo_epochs` regularized optimizer steps on one rollout batch; returns metrics."""
        t0 = time.perf_counter()
        metrics: dict = {}
        if self.spec.regularizer.feasible_set == "iif":
            batch, kept = self._iif_filter(batch)
            metrics["reg/iif_kept_frac"] = kept
        units = example_units(batch.response_mask, self.spec.algorithm.loss_agg)
        share = self._share(units)
        for _ in range(self.spec.algorithm.ppo_epochs):
            self.opt.zero_grad(set_to_none=True)
            seen: dict = {}

            def loss_fn(rows):
                b = batch.rows(rows)
                logp, values = self._forward(b)
                total, parts = self._rl_loss(b, logp, values)
                if rows is None:
                    seen.update(parts)
                return total

            stats = self.reg.backward(loss_fn, units)
            metrics.update(seen)
            metrics.update(self._optimizer_step(share))
            metrics.update(stats.summary())
        self._global_mean(metrics, share)
        metrics["time/update"] = time.perf_counter() - t0
        return metrics

    def needs_target(self, step: int) -> bool:
        """Whether this step must bring target data (a refresh, or merged mode's in-batch rows)."""
        return self.spec.regularizer.target_mode == "merged" or self.reg.needs_refresh(step)

    def weights(self) -> dict[str, torch.Tensor]:
        """Full weights under HF names, for the rollout workers."""
        return hf_state_dict(self.policy)

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def save(self, path: str) -> None:
        """Everything needed for an exact resume: weights, optimizer, schedule, RNG, update count."""
        state = {
            "policy": {k: v for k, v in self.policy.state_dict().items()},
            "value_head": self.value_head.state_dict() if self.value_head is not None else None,
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "rng": torch.get_rng_state(),
            "updates": self.updates,
            "regularizer": self.reg.state_dict(),
        }
        torch.save(state, Path(path) / "learner.pt")

    def load(self, path: str) -> None:
        state = torch.load(Path(path) / "learner.pt", weights_only=False)
        self.policy.load_state_dict(state["policy"])
        if self.value_head is not None:
            self.value_head.load_state_dict(state["value_head"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["rng"])
        self.updates = state["updates"]
        self.reg.load_state_dict(state["regularizer"])

    def save_model(self, path: str) -> str:
        """The final model (adapters for LoRA) and tokenizer, loadable with from_pretrained."""
        self.policy.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return path

    def remove(self) -> None:
        self.reg.remove()

    # ------------------------------------------------------------------------------------------
    # internals

    def _optimizer_step(self, share: float = 1.0) -> dict:
        """(Data parallel: average the ranks' gradients, weighted by `share`), clip, AdamW, schedule."""
        params = [p for g in self.opt.param_groups for p in g["params"]]
        self.comm.average_grads(params, share)
        clip = self.spec.optim.max_grad_norm if self.spec.optim.max_grad_norm is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
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
        """SUM all-reduce the per-layer target cache: every rank then holds g_T of the global batch."""
        if not self.comm.active:
            return
        state = self.reg.state_dict()
        tensors = []
        for b in self.reg.blocks:  # the same order on every rank
            parts = state["targets"].get(b.name)
            if parts is not None:
                tensors += [parts[k] for k in sorted(parts) if parts[k] is not None]
        tensors += [state["unhooked_targets"][k] for k in sorted(state["unhooked_targets"])]
        self.comm.check_same(sum(t.numel() for t in tensors), "the size of the target-gradient cache")
        self.comm.sum_(tensors)

    def _global_mean(self, metrics: dict, share: float) -> None:
        """Loss-like metrics become the global (share-weighted) mean; the rest stay this rank's."""
        if not self.comm.active:
            return
        keys = sorted(k for k in metrics if k == "loss" or k.startswith("loss/") or k in ("clip_frac", "approx_kl"))
        vals = self.comm.sum(torch.tensor([float(metrics[k]) * share for k in keys], dtype=torch.float64))
        metrics.update({k: float(v) for k, v in zip(keys, vals)})

    def _state_tensors(self) -> list[torch.Tensor]:
        mods = [self.policy] + ([self.value_head] if self.value_head is not None else [])
        return [t for m in mods for t in list(m.parameters()) + list(m.buffers())]

    def _placeholder_batch(self) -> RLBatch:
        """One fully masked row: a rank without target rows still runs the (zero) target backward."""
        return RLBatch(
            input_ids=torch.zeros(1, 2, dtype=torch.long), attention_mask=torch.ones(1, 2, dtype=torch.long),
            response_mask=torch.zeros(1, 1), rewards=torch.zeros(1), group_ids=torch.zeros(1, dtype=torch.long),
            advantages=torch.zeros(1, 1),
        )

    def _forward(self, batch: RLBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs of every next token (n, L-1) and, with a critic, values (n, L-1)."""
        out = self.policy(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            use_cache=False,
            output_hidden_states=self.value_head is not None,
        )
        logp = torch.log_softmax(out.logits[:, :-1], dim=-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
        values = None
        if self.value_head is not None:
            values = self.value_head(out.hidden_states[-1][:, :-1]).squeeze(-1)
        return logp, values

    @torch.no_grad()
    def _ref_logprobs(self, batch: RLBatch) -> torch.Tensor:
        ids = batch.input_ids
        if self.ref == "disable_adapter":
            with self.policy.disable_adapter():
                logits = self.policy(input_ids=ids, attention_mask=batch.attention_mask, use_cache=False).logits
        else:
            logits = self.ref(input_ids=ids, attention_mask=batch.attention_mask, use_cache=False).logits
        return torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)

    def _reference(self):
        """The frozen reference policy: the adapter-disabled model under LoRA, else a frozen copy."""
        if self.spec.model.lora is not None:
            return "disable_adapter"
        ref = copy.deepcopy(self.policy).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    def _policy_loss(self, b: RLBatch, logp: torch.Tensor):
        alg = self.spec.algorithm
        old = b.old_logprobs if b.old_logprobs is not None else logp.detach()
        return POLICY_LOSSES.get(alg.policy_loss)(
            PolicyLossInputs(
                logprobs=logp, old_logprobs=old, advantages=b.advantages, response_mask=b.response_mask,
                clip_eps=alg.clip_eps, clip_eps_high=alg.clip_eps_high, agg=alg.loss_agg,
            )
        )

    def _rl_loss(self, b: RLBatch, logp: torch.Tensor, values: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """Policy loss + KL loss + value loss of a (sub-)batch, each normalised over its own rows."""
        alg = self.spec.algorithm
        pl = self._policy_loss(b, logp)
        total = pl.loss
        parts = {"loss/policy": float(pl.loss.detach()), "clip_frac": pl.clip_frac, "approx_kl": pl.approx_kl}
        if b.ref_logprobs is not None and not alg.kl_in_reward:
            kl = kl_loss(logp, b.ref_logprobs, b.response_mask, kind=alg.kl_estimator, agg=alg.loss_agg)
            total = total + alg.kl_coef * kl
            parts["loss/kl"] = float(kl.detach())
        if values is not None:
            vl = value_loss(values, b.values, b.returns, b.response_mask, clip=alg.clip_eps, agg=alg.loss_agg)
            total = total + alg.vf_coef * vl.loss
            parts["loss/value"] = float(vl.loss.detach())
        parts["loss"] = float(total.detach())
        return total, parts

    def _iif_filter(self, batch: RLBatch) -> tuple[RLBatch, float]:
        """IIF (method.md 2.3): score the whole buffer once with the advantage-weighted
        per-sample token-mean log-prob, keep the subset rule's rows, train on them plainly."""

        def score_loss(rows):
            b = batch.rows(rows)
            logp, _ = self._forward(b)
            per_ex = -(b.advantages * logp * b.response_mask).sum(1) / b.response_mask.sum(1).clamp(min=1)
            return per_ex.sum() / b.size

        kept = self.reg.filter_buffer([(score_loss, torch.ones(batch.size))])
        return batch.rows(kept), kept.numel() / batch.size


LearnerActor = ray.remote(Learner)


def _concat_rows(a: dict, b: dict) -> dict:
    """Stack general rows then target rows (merged mode), right-padding to the longer batch."""
    width = max(a["input_ids"].shape[1], b["input_ids"].shape[1])
    pad = {"input_ids": 0, "attention_mask": 0, "labels": -100}

    def widen(t, key):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad[key])

    return {k: torch.cat([widen(a[k], k), widen(b[k], k)]) for k in a}
