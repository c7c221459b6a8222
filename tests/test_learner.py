"""Learner pieces that need no Ray: LoRA weight export, the zero-variance guard, IIF, target objectives."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from drpt_ray.config import JobSpec
from drpt_ray.learner import Learner, RLBatch, build_batch, hf_state_dict
from drpt_ray.algorithms import standardised_rewards
from drpt_ray.lm_losses import token_logprobs


def test_zero_variance_guard():
    # mean 0.5, sample std sqrt(1/3): z = +-0.5 / 0.57735 = +-0.866025
    z = standardised_rewards(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    assert torch.allclose(z, torch.tensor([0.866025, -0.866025, -0.866025, 0.866025], dtype=torch.float64), atol=1e-6)
    # no variance, or one sample: r - 0.5, so the target gradient is never silently zero
    assert torch.equal(standardised_rewards(torch.tensor([1.0, 1.0, 1.0])),
                       torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64))
    assert torch.equal(standardised_rewards(torch.tensor([0.0])), torch.tensor([-0.5], dtype=torch.float64))


def test_lora_weights_export_merged_plain_hf_names(tmp_path):
    spec = JobSpec(mode="rlvr", output_dir=str(tmp_path), model={"lora": {"r": 4, "alpha": 8}})
    learner = Learner(spec)
    with torch.no_grad():  # make the adapters non-trivial (B starts at zero)
        for n, p in learner.policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    sd = hf_state_dict(learner.policy)
    assert not any("lora" in k or "base_layer" in k or k.startswith("base_model") for k in sd)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-model", attn_implementation="eager")
    assert set(sd) == set(plain.state_dict())
    plain.load_state_dict(sd)
    ids = torch.tensor([[5, 9, 33, 60, 7, 80]])
    want = learner.policy(input_ids=ids).logits
    got = plain(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    # the export did not modify the trained model
    assert torch.allclose(learner.policy(input_ids=ids).logits, want)


def _rl_batch(learner: Learner, n_prompts=4, n=4, seed=0, prompt_len=6) -> "RLBatch":
    g = torch.Generator().manual_seed(seed)
    prompts, responses, rewards, groups = [], [], [], []
    for p in range(n_prompts):
        prompt = torch.randint(5, 200, (prompt_len,), generator=g).tolist()
        for _ in range(n):
            prompts.append(prompt)
            responses.append(torch.randint(5, 200, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
                             .tolist())
            rewards.append(float(torch.rand(1, generator=g) > 0.5))
            groups.append(p)
    batch = build_batch(prompts, responses, rewards, groups, pad_id=3)
    batch = learner.score_rollouts(batch)
    from drpt_ray.algorithms import ADVANTAGE_ESTIMATORS, AdvantageInputs

    batch.advantages = ADVANTAGE_ESTIMATORS.get("grpo")(AdvantageInputs(batch.rewards, batch.group_ids,
                                                                        batch.response_mask))
    return batch


@pytest.mark.parametrize("objective", ["reward", "token_pg", "train_loss"])
def test_target_objectives_fill_the_cache(tmp_path, objective):
    spec = JobSpec(mode="rlvr", output_dir=str(tmp_path), algorithm={"target_objective": objective})
    learner = Learner(spec)
    batch = _rl_batch(learner)
    m = learner.capture_target(batch)
    assert learner.reg.captured and len(learner.reg.targets) == len(learner.reg.blocks)
    assert all(float(t.weight.abs().sum()) > 0 for t in learner.reg.targets.values())
    assert m["target/objective"] != 0
    before = {n: p.detach().clone() for n, p in learner.policy.named_parameters()}
    out = learner.rl_step(batch)
    assert any(not torch.equal(before[n], p) for n, p in learner.policy.named_parameters())
    assert 0 < out["reg/kept_frac_mean"] <= 1


def test_token_pg_target_gradient_matches_brute_force(tmp_path):
    """g_T of `token_pg` = the gradient of -sum_{i,t} A_it log pi(y_it) / T, with T the target
    batch's response tokens, from one row at a time: a float64 copy of the policy, log-softmax of
    its logits at each response position, summed by hand (no batching, padding or masking). The
    learner runs in float32: agreement to 1e-5 of each layer's largest entry."""
    spec = JobSpec(mode="rlvr", output_dir=str(tmp_path), algorithm={"target_objective": "token_pg"})
    learner = Learner(spec)
    batch = _rl_batch(learner, n_prompts=2, n=3)
    learner.capture_target(batch)
    got = {name: t["weight"] for name, t in learner.reg.state_dict()["targets"].items()}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-model", dtype=torch.float64,
                                                 attn_implementation="eager")
    model.load_state_dict({k: v.double() for k, v in hf_state_dict(learner.policy).items()})
    weights = {name: model.get_submodule(name).weight for name in got}
    tokens = int(batch.response_mask.sum())
    total = 0.0
    for i in range(batch.size):
        ids = batch.input_ids[i][batch.attention_mask[i] != 0]  # this row alone, its right padding cut
        logp = model(input_ids=ids[None]).logits[0].log_softmax(-1)
        for t in (batch.response_mask[i] != 0).nonzero().flatten().tolist():  # logits at t predict token t + 1
            total = total - float(batch.advantages[i, t]) * logp[t, ids[t + 1]] / tokens
    want = dict(zip(weights, torch.autograd.grad(total, list(weights.values()))))
    err = {name: float((got[name].double() - want[name]).abs().max() / want[name].abs().max()) for name in want}
    assert max(err.values()) < 1e-5, err


MERGED_SETS = [{"feasible_set": "layerwise_subset"}, {"feasible_set": "global_subset"},
               {"feasible_set": "global_subset", "passes": "two_pass"}, {"feasible_set": "soft_subset", "tau": 0.5}]


@pytest.mark.parametrize("objective", ["token_pg", "reward", "train_loss"])
@pytest.mark.parametrize("reg", MERGED_SETS, ids=lambda r: "-".join(map(str, r.values())))
def test_merged_target_rows_equal_a_separate_capture_in_rl(tmp_path, reg, objective):
    """Merged mode (the target rollouts in the general batch's forward and backward) against
    separate mode (their own capture backward first), float64, same weights and rollouts, a KL
    term and a general batch narrower than the target one (so the merge pads it): the gradient of
    every trained parameter, the kept fractions and the cosine to g_T agree to 1e-6 of each
    tensor's largest entry. Not to float64's 1e-15: Hugging Face's RMSNorm computes in float32
    whatever the model's dtype, and the two paths reduce over differently padded shapes (the
    regularizer's own llama oracles use 2e-6 for the same reason)."""
    def learner(mode: str) -> Learner:
        spec = JobSpec(mode="rlvr", output_dir=str(tmp_path), model={"dtype": "float64"},
                       optim={"max_grad_norm": None},  # .grad after the step is the unclipped gradient
                       algorithm={"target_objective": objective, "kl_coef": 0.05},
                       regularizer={"selection": "topk", "frac": 0.5, **reg, "target_mode": mode})
        return Learner(spec)

    grads, metrics = {}, {}
    for mode in ("separate", "merged"):
        lrn = learner(mode)
        general = _rl_batch(lrn, n_prompts=3, n=4, seed=1)
        target = _rl_batch(lrn, n_prompts=2, n=4, seed=2, prompt_len=9)
        assert general.input_ids.shape[1] != target.input_ids.shape[1]
        assert general.advantages.abs().sum() > 0 and target.advantages.abs().sum() > 0
        lrn.capture_target(target)
        metrics[mode] = lrn.rl_step(general)
        grads[mode] = {n: p.grad.clone() for n, p in lrn.policy.named_parameters() if p.grad is not None}
    assert grads["merged"].keys() == grads["separate"].keys() and grads["merged"]
    for name, g in grads["separate"].items():
        assert float((grads["merged"][name] - g).abs().max()) <= 1e-6 * float(g.abs().max()), name
    for key in ("grad_norm", "reg/kept_frac_mean", "reg/kept_frac_min", "reg/cos", "loss", "loss/kl"):
        assert metrics["merged"][key] == pytest.approx(metrics["separate"][key], rel=1e-6, abs=1e-12), key
    assert metrics["merged"]["reg/kept_frac_min"] < 1  # the selection really dropped rows


def test_merged_mode_needs_the_target_rows_before_the_step(tmp_path):
    spec = JobSpec(mode="rlvr", output_dir=str(tmp_path), regularizer={"target_mode": "merged"})
    lrn = Learner(spec)
    with pytest.raises(RuntimeError, match="capture_target"):
        lrn.rl_step(_rl_batch(lrn))


def test_generate_batches_prompts_of_different_lengths_as_one_at_a_time(tmp_path):
    """Learner.generate (SFT's eval/target_exact) pads a batch on the left: each answer equals the
    greedy answer to its prompt alone, unpadded, from the same weights."""
    learner = Learner(JobSpec(mode="sft", output_dir=str(tmp_path)))
    prompts = ["map:a,b->", "a much longer prompt of several words:", "x"]
    got = learner.generate(prompts, max_new_tokens=6)
    tok = learner.tokenizer
    for prompt, answer in zip(prompts, got):
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = learner.policy.generate(**ids, do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id)
        assert answer == tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(set(got)) > 1  # a random tiny model, but not one answer for all


def test_iif_filters_the_buffer_then_trains_plainly(tmp_path):
    spec = JobSpec(mode="rlvr", output_dir=str(tmp_path),
                   regularizer={"feasible_set": "iif", "selection": "filter", "frac": 1.0})
    learner = Learner(spec)
    batch = _rl_batch(learner)
    learner.capture_target(batch)
    m = learner.rl_step(batch)
    assert 0 < m["reg/iif_kept_frac"] <= 1
    assert m["reg/kept_frac_mean"] == 1.0  # the kept buffer trains with plain gradients


def test_learner_device_needs_cuda_when_gpus_are_reserved(tmp_path):
    from drpt_ray.learner import learner_device

    assert learner_device(JobSpec(output_dir=str(tmp_path))) == torch.device("cpu")
    gpu = JobSpec(output_dir=str(tmp_path), resources={"learner_num_gpus": 1})
    if torch.cuda.is_available():  # a GPU machine: the worker's current device
        assert learner_device(gpu).type == "cuda"
    else:
        with pytest.raises(RuntimeError, match="resources.learner_num_gpus"):
            learner_device(gpu)


def test_lora_checkpoint_round_trip(tmp_path):
    """The name-keyed checkpoint (weights + AdamW state of a peft model) restores a fresh learner exactly."""
    from drpt_ray.data import load_task, tokenize_sft

    spec = JobSpec(mode="sft", output_dir=str(tmp_path),
                   model={"lora": {"r": 4, "alpha": 8}}, regularizer={"feasible_set": "full"})
    a = Learner(spec)
    splits = load_task(spec.data)
    batch = lambda lo: tokenize_sft(a.tokenizer, splits.general[lo : lo + 4], spec.data.max_len)  # noqa: E731
    a.sft_step(batch(0), None)
    a.save(str(tmp_path))
    b = Learner(spec)
    b.load(str(tmp_path))
    ma, mb = a.sft_step(batch(4), None), b.sft_step(batch(4), None)
    assert ma["loss"] == mb["loss"] and ma["grad_norm"] == mb["grad_norm"]
    pa, pb = dict(a.policy.named_parameters()), dict(b.policy.named_parameters())
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert b.updates == a.updates == 2


@pytest.mark.parametrize("feasible", ["layerwise_subset", "global_subset"])
def test_gradient_checkpointing_changes_no_number(tmp_path, feasible):
    """Recomputed activations feed the regularizer's hooks the same (dY, X): the step is bit-identical."""
    from drpt_ray.data import load_task, tokenize_sft

    runs = []
    for gc in (False, True):
        spec = JobSpec(mode="sft", output_dir=str(tmp_path), model={"dtype": "float64", "gradient_checkpointing": gc},
                       regularizer={"feasible_set": feasible})
        learner = Learner(spec)
        assert learner.policy.is_gradient_checkpointing == gc
        splits = load_task(spec.data)
        tok = lambda rows: tokenize_sft(learner.tokenizer, rows, spec.data.max_len)  # noqa: E731
        m = learner.sft_step(tok(splits.general[:6]), tok(splits.target[:3]))
        runs.append((m, {k: v.detach().clone() for k, v in learner.policy.state_dict().items()}))
        learner.remove()
    (m0, w0), (m1, w1) = runs
    assert m1["loss"] == m0["loss"] and m1["grad_norm"] == m0["grad_norm"] and m1["reg/cos"] == m0["reg/cos"]
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_kept_advantage_mean_by_hand():
    from drpt_ray.learner.learner import kept_advantage_mean

    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    batch = RLBatch(input_ids=torch.zeros(3, 3, dtype=torch.long), attention_mask=torch.ones(3, 3), response_mask=mask,
                    rewards=torch.zeros(3), group_ids=torch.zeros(3, dtype=torch.long),
                    advantages=torch.tensor([[1.0, 1.0], [-2.0, 9.0], [1.0, 1.0]]))  # sequence advantages 1, -2, 1
    everyone = torch.ones(3, dtype=torch.float64)
    assert kept_advantage_mean({"a": everyone}, batch) == pytest.approx(0.0)  # the full group cancels
    # Layer a keeps rows 0 and 1 (mean -0.5), layer b keeps row 2 twice as heavily as row 1 ((2 - 2) / 3 = 0).
    weights = {"a": torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64),
               "b": torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)}
    assert kept_advantage_mean(weights, batch) == pytest.approx((-0.5 + 0.0) / 2)


def test_truncated_responses_get_no_policy_gradient(tmp_path):
    learner = Learner(JobSpec(mode="rlvr", output_dir=str(tmp_path), regularizer={"feasible_set": "full"}))
    batch = _rl_batch(learner)
    batch.advantages = torch.zeros_like(batch.advantages)
    batch.advantages[1] = 1.0  # one row carries all the signal ...
    batch.truncated = torch.zeros(batch.size, dtype=torch.bool)
    batch.truncated[1] = True  # ... and was cut at max_new_tokens
    assert learner.rl_step(batch.without_truncated())["grad_norm"] == 0.0
    assert learner.rl_step(batch)["grad_norm"] > 0.0  # unmasked, the same row moves the policy


def test_entropy_bonus_is_in_the_loss_and_keeps_the_entropy_up(tmp_path):
    def entropy_after_steps(coef: float) -> tuple[dict, float]:
        spec = JobSpec(mode="rlvr", output_dir=str(tmp_path / str(coef)), regularizer={"feasible_set": "full"},
                       algorithm={"entropy_coef": coef}, optim={"lr": 1e-2, "warmup_frac": 0.0})
        learner = Learner(spec)
        batch = _rl_batch(learner)
        batch.advantages = torch.ones_like(batch.advantages)  # reinforce every sampled token: entropy falls
        first = learner.rl_step(batch)
        return first, [learner.rl_step(batch) for _ in range(3)][-1]["policy/entropy"]

    first, plain = entropy_after_steps(0.0)
    first_b, with_bonus = entropy_after_steps(1.0)
    assert first_b["policy/entropy"] == pytest.approx(first["policy/entropy"])  # same seed, same start
    assert first_b["loss"] == pytest.approx(first_b["loss/policy"] - 1.0 * first_b["policy/entropy"], rel=1e-5)
    assert first["loss"] == pytest.approx(first["loss/policy"], rel=1e-6)
    assert with_bonus > plain + 0.01, (plain, with_bonus)


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8}])
def test_the_warm_started_policy_is_the_kl_reference_and_survives_a_resume(tmp_path, lora):
    """After the warm start the reference's log-probs are the policy's (KL 0 at the start of RL),
    not those of the loaded weights; a fresh learner restored from a checkpoint has the same one."""
    from drpt_ray.data import load_task, tokenize_sft

    spec = JobSpec(mode="rlvr", output_dir=str(tmp_path), model={"lora": lora}, algorithm={"kl_coef": 0.05})
    a = Learner(spec)
    general = tokenize_sft(a.tokenizer, load_task(spec.data).general[:8], spec.data.max_len)
    batch = _rl_batch(a)
    start = a.ref.logprobs(batch)
    a.warm_start([general] * 5, lr=1e-2)
    policy = token_logprobs(a.policy, batch.input_ids, batch.attention_mask)
    assert (policy - start).abs().max() > 0.1  # the warm start moved the policy ...
    assert torch.allclose(a.ref.logprobs(batch), policy, atol=1e-5)  # ... and the reference with it
    a.capture_target(batch)
    a.rl_step(batch)  # RL moves the policy away from the reference again
    assert (token_logprobs(a.policy, batch.input_ids, batch.attention_mask) - policy).abs().max() > 1e-4
    a.save(str(tmp_path))
    b = Learner(spec)
    b.load(str(tmp_path))
    assert torch.equal(b.ref.logprobs(batch), a.ref.logprobs(batch))
