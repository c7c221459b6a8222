"""RL end to end on a real local Ray, real vLLM CPU rollout workers and a tiny model built in code
(plus a float64 oracle for the KL term, on an in-process learner)."""

from __future__ import annotations

import json
import statistics

import pytest
import ray
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from drpt_ray.config import JobSpec
from drpt_ray.learner import Learner, build_batch
from drpt_ray.job import latest_checkpoint
from drpt_ray.trainer import run_job
from tests.rl_helpers import kill_rollout_worker, rlvr

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def test_rlvr_demo_learns_without_collapsing(tmp_path):
    """The README demo (seed 0): 200 warm-start SFT steps, then 100 GRPO steps with the layer-wise
    regularizer. Offline, with the same spec over seeds 0-9, every assertion below held on every seed
    (the tightest: held-out gain +0.086 where +0.055 was needed on seed 7, which starts at 0.891;
    minimum train reward 0.22 on seed 7; mean cosine >= 0.37; response length <= 5.1). Under pytest
    the same seed takes another trajectory (thread and float-summation order differ: seed 0 went
    0.734 -> 1.000 here, with one step at length 6.06), so every bound leaves a margin. With the
    former `reward` target objective seed 1 collapsed to reward 0 at step 43 (learner docstring)."""
    r = run_job(rlvr(tmp_path))
    h = r.history
    series = lambda key: [m[key] for m in h if key in m]  # noqa: E731
    evals = series("eval/target_reward")
    # held-out target reward (greedy, strict verifier) rose by 0.1, or by half the way to 1 from a high start
    assert sum(evals[-2:]) / 2 >= evals[0] + min(0.1, (1 - evals[0]) / 2), evals
    assert min(series("reward/reward_mean")) > 0.2  # never collapsed to zero reward ...
    assert sum(series("reward/response_len")[-10:]) / 10 < 6.0  # ... nor to responses cut at max_new_tokens (8)
    assert sum(series("reg/cos")) / len(series("reg/cos")) > 0.1  # the curated update leans towards g_T
    m = h[-1]
    for phase in ("gen", "reward", "logprob", "adv", "regularize", "update", "sync"):
        assert m[f"time/{phase}"] > 0, phase
    assert 0 < m["reg/kept_frac_mean"] <= 1 and m["policy/entropy"] > 0 and m["rollout/mismatch_kl"] < 1e-3
    assert 0 <= m["eval/target_pass@1"] <= m["eval/target_pass@4"] <= 1 and m["eval/target_pass@4"] > 0.5
    assert (tmp_path / "curves.png").exists() and (tmp_path / "model" / "model.safetensors").exists()
    assert_samples_tables(tmp_path / "samples.jsonl", rlvr(tmp_path))


def assert_samples_tables(path, spec) -> None:
    """samples.jsonl (`spec.samples`): every `every` steps the first groups of the general and target
    rollouts, all n responses each, with advantages that are GRPO's of the logged rewards; at every
    evaluation the greedy answers, right or wrong by the strict verifier."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    every, n = spec.samples.every, spec.rollout.sampling.n
    by = lambda split: sorted({r["step"] for r in rows if r["split"] == split})  # noqa: E731
    assert by("general") == by("target") == list(range(every, spec.steps + 1, every))
    assert by("eval") == list(range(0, spec.steps + 1, spec.eval_every))
    assert all(r["reward"] in (0.0, 1.0) and r["advantage"] is None for r in rows if r["split"] == "eval")
    # not vacuous: groups whose rewards differ, so the advantage check below has something to check
    assert sum(abs(r["advantage"]) > 0.1 for r in rows if r["split"] == "general") >= 10
    for step in by("general"):
        for split in ("general", "target"):
            table = [r for r in rows if r["step"] == step and r["split"] == split]
            assert [r["group"] for r in table] == [g for g in range(spec.samples.groups) for _ in range(n)]
            for g in range(spec.samples.groups):
                group = [r for r in table if r["group"] == g]
                assert len({r["prompt"] for r in group}) == 1
                rewards = [r["reward"] for r in group]
                mean, std = statistics.fmean(rewards), statistics.stdev(rewards)
                for r in group:
                    assert r["advantage"] == pytest.approx((r["reward"] - mean) / (std + 1e-6), abs=1e-4), (step, r)


def test_rlhf_ppo_with_critic_and_kl(tmp_path):
    spec = rlvr(
        tmp_path, mode="rlhf", steps=4, eval_every=2, reward={"kind": "model"},
        algorithm={"advantage": "gae", "policy_loss": "ppo_clip", "kl_coef": 0.05,
                   "ppo_epochs": 2, "target_objective": "token_pg"},
        regularizer={"feasible_set": "global_subset", "passes": "two_pass", "selection": "filter", "frac": 1.0},
        warm_start_sft_steps=20,
    )
    r = run_job(spec)
    assert r.steps == 4
    m = r.history[-1]
    assert {"loss/policy", "loss/kl", "loss/value", "clip_frac", "approx_kl", "eval/target_reward"} <= set(m)
    assert all(torch.isfinite(torch.tensor(h["reward/reward_mean"])) for h in r.history if "reward/reward_mean" in h)
    # the KL term is in the optimised loss with +kl_coef (entropy_coef 0, vf_coef 0.1); its value has
    # a float64 oracle in test_kl_loss_is_k3_to_the_starting_weights
    for h in r.history[1:]:
        want = h["loss/policy"] + 0.05 * h["loss/kl"] + 0.1 * h["loss/value"]
        assert h["loss"] == pytest.approx(want, rel=1e-5, abs=1e-7), h["step"]
    assert m["loss/kl"] > 0  # 20 warm-start SFT steps moved the policy off its starting weights


def test_kl_loss_is_k3_to_the_starting_weights(tmp_path):
    """`loss/kl` against a float64 oracle: k3 = exp(d) - d - 1 per response token, d = log p_start -
    log p, token-mean over response tokens, with p_start from the weights the learner was built with
    and p from those the step starts from (one PPO epoch: the reported value is the pre-update one)."""
    spec = JobSpec(mode="rlvr", output_dir=str(tmp_path), model={"dtype": "float64"},
                   regularizer={"feasible_set": "full"}, algorithm={"kl_coef": 0.1})
    learner = Learner(spec)
    start = {k: v.clone() for k, v in learner.policy.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the step starts away from the reference
        for p in learner.policy.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
    current = {k: v.clone() for k, v in learner.policy.state_dict().items()}
    prompts = [torch.randint(5, 200, (6,), generator=g).tolist() for _ in range(4)]
    responses = [torch.randint(5, 200, (k,), generator=g).tolist() for k in (2, 5, 3, 4)]
    batch = learner.score_rollouts(build_batch(prompts, responses, [1.0, 0.0, 1.0, 0.0], [0, 0, 1, 1], pad_id=3))
    batch.advantages = torch.ones_like(batch.response_mask)
    m = learner.rl_step(batch)

    def next_token_logp(weights: dict) -> torch.Tensor:  # (n, L-1): logit of the next token - logsumexp
        # a plain HF model (the learner's carries the regularizer's hooks)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-model", dtype=torch.float64,
                                                     attn_implementation="eager")
        model.load_state_dict(weights)
        with torch.no_grad():
            logits = model.eval()(input_ids=batch.input_ids,
                                  attention_mask=batch.attention_mask).logits[:, :-1].double()
        return logits.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1) - logits.logsumexp(-1)

    d = next_token_logp(start) - next_token_logp(current)
    mask = batch.response_mask.double()
    want = float(((d.exp() - d - 1) * mask).sum() / mask.sum())
    assert want > 1e-3  # the perturbation moved the policy, so a reference that follows it would read ~0
    assert m["loss/kl"] == pytest.approx(want, rel=1e-6)


def test_rl_with_fsdp_learner(tmp_path):
    """PPO with a critic and a reference policy on 2 FSDP learner workers (CPU, gloo): rollouts
    from vLLM, weights gathered on rank 0 and loaded into the rollout worker every step, one
    checkpoint, the final model saved from the gathered weights.

    The oracle is the same job on 2 plain data-parallel workers (which tests/test_learner_group.py
    holds equal to one in-process learner in float64): the same rows per rank and the same seed
    draw the same rollouts, so every step's metrics, the checkpoint and the final model agree to
    float32 rounding (measured: 1e-6 relative, 8e-7 on weights of scale 1). A float32 run on one
    worker is no oracle here: its row split changes the rounding, and AdamW amplifies that on
    near-zero gradients to a few per cent of an update (measured).
    """
    job = dict(
        steps=3, eval_every=3, warm_start_sft_steps=4, checkpoint={"every": 2, "keep": 2},
        # `reward`: after 4 warm-start steps every reward is 0, and its zero-variance guard keeps g_T
        # non-zero (token_pg's g_T would be 0: nothing for the sharded cosines to check). With zero
        # advantages and the KL reference equal to the warm-started policy, the entropy bonus is
        # what makes the update non-zero, so that the cosine exists.
        algorithm={"advantage": "gae", "policy_loss": "ppo_clip",
                   "kl_coef": 0.05, "ppo_epochs": 2, "target_objective": "reward",
                   "entropy_coef": 0.01},
        regularizer={"feasible_set": "layerwise_subset", "kernel": "sketch"},
    )
    workers = {"learner_num_workers": 2, "learner_num_cpus": 0.5}
    r = run_job(rlvr(tmp_path / "fsdp", **job, resources={**workers, "fsdp": True}))
    dp = run_job(rlvr(tmp_path / "dp", **job, resources=workers))
    assert r.steps == dp.steps == 3
    m = r.history[-1]
    assert {"loss/policy", "loss/kl", "loss/value", "reg/cos", "eval/target_reward"} <= set(m)
    assert m["time/sync"] > 0
    for a, b in zip(r.history[1:], dp.history[1:], strict=True):
        assert ((a["reward/reward_mean"], a["reward/response_len"])
                == (b["reward/reward_mean"], b["reward/response_len"]))
        for key in ("loss", "loss/kl", "loss/value", "grad_norm", "approx_kl",
                    "reg/cos", "reg/cos_layer_min", "rollout/mismatch_kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    # the checkpoint of step 2 holds full tensors of policy and critic, the final model one full copy,
    # each equal to the data-parallel one
    ckpt, ckpt_dp = (torch.load(tmp_path / x / "checkpoints" / "step_0000002" / "learner.pt",
                                weights_only=False)["model"] for x in ("fsdp", "dp"))
    final, final_dp = (load_file(tmp_path / x / "model" / "model.safetensors") for x in ("fsdp", "dp"))
    assert latest_checkpoint(tmp_path / "fsdp").name == "step_0000003"  # the last step's
    assert ({"policy.lm_head.weight", "value_head.weight"} <= set(ckpt)
            and set(ckpt) == set(ckpt_dp) and set(final) == set(final_dp))
    diffs = []
    for got, want in ((ckpt, ckpt_dp), (final, final_dp)):
        scale = max(float(v.abs().max()) for v in want.values())
        diffs.append(max(float((got[k] - want[k]).abs().max()) for k in want))
        assert diffs[-1] <= 1e-5 * scale, diffs
    # step 3 moved the policy by far more than that difference
    step3 = max(float((final_dp[k] - ckpt_dp[f"policy.{k}"]).abs().max()) for k in final_dp)
    assert step3 > 100 * diffs[1], (step3, diffs)


def test_job_survives_a_killed_rollout_worker(tmp_path):
    killed = []

    def kill_once(m):
        if m["step"] == 2 and not killed:
            killed.append(kill_rollout_worker())

    r = run_job(rlvr(tmp_path, steps=5, eval_every=5, warm_start_sft_steps=20), on_metrics=kill_once)
    assert killed and r.steps == 5
    assert [m["step"] for m in r.history] == [0, 1, 2, 3, 4, 5]


class _Crash(Exception):
    pass


def test_rl_kill_and_resume_matches_uninterrupted(tmp_path):
    spec = dict(steps=4, eval_every=4, warm_start_sft_steps=20, checkpoint={"every": 2, "keep": 2})
    full = run_job(rlvr(tmp_path / "a", **spec))

    def crash(m):
        if m["step"] == 3:
            raise _Crash()

    with pytest.raises(_Crash):
        run_job(rlvr(tmp_path / "b", **spec), on_metrics=crash)
    resumed = run_job(rlvr(tmp_path / "b", **spec))
    ca, cb = (latest_checkpoint(tmp_path / x) for x in "ab")
    assert ca.name == cb.name == "step_0000004"  # the last step's
    assert json.loads((ca / "trainer.json").read_text()) == json.loads((cb / "trainer.json").read_text())
    wa, wb = (torch.load(c / "learner.pt", weights_only=False)["model"] for c in (ca, cb))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert resumed.steps == full.steps == 4
    # after the resume the same rollouts are drawn (seeded per step) and the same updates made
    fa, fb = (load_file(tmp_path / x / "model" / "model.safetensors") for x in "ab")
    worst = max(float((fa[k] - fb[k]).abs().max()) for k in fa)
    assert worst < 1e-5, worst


def test_eval_before_warm_start_is_the_loaded_model(tmp_path):
    """`eval_before_warm_start` logs the held-out figures of the model as loaded: the same numbers a
    run without a warm start reports at its step 0 (greedy decoding, the same eval prompts)."""
    one = dict(steps=1, eval_every=1, eval_samples=0)
    warm = run_job(rlvr(tmp_path / "warm", **one, eval_before_warm_start=True))
    cold = run_job(rlvr(tmp_path / "cold", **one, warm_start_sft_steps=0))
    start = warm.history[0]
    assert start["eval_base/target_reward"] == cold.history[0]["eval/target_reward"]
    # the warm start moved the policy: after it the held-out reward differs (0 -> 0.73 on seed 0)
    assert start["eval/target_reward"] > start["eval_base/target_reward"] + 0.3
    assert not any(k.startswith("eval_base/") for k in cold.history[0])


def test_trl_conversations_with_weighted_reward_functions(tmp_path, monkeypatch):
    """TRL conversational rows, one extra column and two weighted functions through a real run. The
    functions read what the data and the chat template fix, so every figure is known in advance:
    `chat` is 1 only for a prompt rendered by the template (the run renders conversations although
    data.chat_template is null), `level` returns the row's own column (1 in the general pool, 3 in
    the target pool); the reward is 2 * chat + 0.5 * level."""
    (tmp_path / "drpt_conv_rewards.py").write_text(
        "def chat(prompt, response, reference):\n"
        "    return float(prompt.startswith('<|im_start|>user\\nrev ') and prompt.endswith('<|im_start|>assistant\\n'))"
        "\n\n\ndef level(prompt, response, reference, level):\n    return float(level)\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # the reward's child process reads the driver's sys.path

    def pool(name: str, words: list[str], lvl: int) -> str:
        rows = [{"messages": [{"role": "user", "content": f"rev {w} ="}, {"role": "assistant", "content": w[::-1]}],
                 "level": lvl} for w in words]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / f"{name}.jsonl")

    data = {"task": None, "general_path": pool("general", ["abc", "bcd", "cde", "def"] * 4, 1),
            "target_path": pool("target", ["fed", "gfe"], 3)}
    reward = {"kind": "function", "functions": [{"function": "drpt_conv_rewards:chat", "weight": 2.0},
                                                {"function": "drpt_conv_rewards:level", "weight": 0.5}]}
    r = run_job(rlvr(tmp_path / "out", data=data, reward=reward, steps=2, eval_every=2, eval_samples=0,
                     warm_start_sft_steps=0, samples={"every": 1, "groups": 1}))
    m = r.history[-1]
    assert (m["reward/chat/mean"], m["reward/level/mean"], m["reward/reward_mean"]) == (1.0, 1.0, 2.5)
    assert (m["target/chat/mean"], m["target/level/mean"], m["target/reward_mean"]) == (1.0, 3.0, 3.5)
    assert m["reward/errors"] == 0 and m["eval/target_reward"] == 3.5
    # the samples table shows each function's own score beside the weighted reward
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    want = {"general": ({"chat": 1.0, "level": 1.0}, 2.5), "target": ({"chat": 1.0, "level": 3.0}, 3.5),
            "eval": ({"chat": 1.0, "level": 3.0}, 3.5)}
    assert {r["split"] for r in rows} == set(want)
    assert all((r["parts"], r["reward"]) == want[r["split"]] for r in rows)
