"""Asynchronous RL (`rollout.max_staleness`): generation overlapped with the learner's update, on a
real local Ray, real vLLM CPU rollout workers and the demo's tiny model built in code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from drpt_ray.config import JobSpec
from drpt_ray.data import load_task, tokenize_sft
from drpt_ray.demo import RLVR_DEMO
from drpt_ray.learner import Learner
from drpt_ray.metrics import PhaseTimer
from drpt_ray.models import model_dir
from drpt_ray.rollout import make_rollout_workers
from drpt_ray.job import Context
from drpt_ray.trainer import Group, rollout_batch, run_job
from tests.rl_helpers import kill_rollout_worker, rlvr

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).parent / "golden" / "rl_sync_metrics.json"


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


# A short seeded run of the synchronous loop: its metrics were recorded at commit 222c3de, before
# the asynchronous loop existed (DRPT_WRITE_GOLDEN=1 rewrites the file from the code at hand).
SYNC_RUN = dict(steps=4, eval_every=2, warm_start_sft_steps=20)


def test_staleness_0_is_the_synchronous_loop(tmp_path):
    """`max_staleness: 0` (the default) runs today's loop step for step: every metric the loop
    logged before the asynchronous mode existed comes out the same (rewards, lengths and evaluations
    exactly, losses and norms to float32 rounding); only timings differ and new keys may join."""
    timings = ("time/", "reg/time_s", "reg/score_s")
    got = [{k: v for k, v in m.items() if not k.startswith(timings)}
           for m in run_job(rlvr(tmp_path, **SYNC_RUN)).history]
    if os.environ.get("DRPT_WRITE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert set(w) <= set(g), (w["step"], set(w) - set(g))
        for key, value in w.items():
            if key.startswith(("reward/", "eval/", "target/reward", "step")):
                assert g[key] == value, (w["step"], key)
            else:
                assert g[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (w["step"], key)


def test_stale_rollouts_get_capped_importance_weights(tmp_path):
    """Rollouts sampled by the initial weights (version 0) and trained after the learner moved on
    (20 SFT steps, version 1): each token's advantage is multiplied by min(exp(logp_now -
    logp_behaviour), upper) (algorithm.rollout_correction, token-level truncation), with logp_now
    from an independent float64 forward of the learner's current weights and logp_behaviour the
    rollout engine's own log-probs of what it sampled."""
    cap = 1.5
    spec = rlvr(tmp_path,
                rollout={"max_staleness": 1, "sampling": {"n": 8, "max_new_tokens": 8, "temperature": 1.0, "seed": 3}},
                algorithm={"advantage": "grpo", "policy_loss": "ppo_clip",
                                       "rollout_correction": {"upper": cap}})
    learner = Learner(spec)
    tok = learner.tokenizer
    splits = load_task(spec.data)
    (worker,) = make_rollout_workers(str(model_dir(spec.model, tmp_path)), spec.rollout, 0)
    examples = splits.general[:4]
    rollouts = ray.get(worker.generate.remote([tok(e.prompt)["input_ids"] for e in examples], spec.rollout.sampling),
                       timeout=300)
    assert {r.weights_version for r in rollouts} == {0}
    learner.warm_start([tokenize_sft(tok, splits.general[i : i + 16], spec.data.max_len) for i in range(0, 320, 16)],
                       1e-3)
    n = spec.rollout.sampling.n
    groups = [Group(e, rollouts[i * n : (i + 1) * n], [float(j % 2) for j in range(n)]) for i, e in enumerate(examples)]

    def batch_of(s: JobSpec):
        ctx = Context(spec=s, out=tmp_path, splits=splits, tokenizer=tok, learner=learner, general=None, target=None)
        return rollout_batch(ctx, groups, "general", stale=True, t=PhaseTimer())[0]

    corrected = batch_of(spec)
    plain = batch_of(rlvr(tmp_path, rollout=spec.rollout.model_dump(exclude={"max_staleness"}),
                          algorithm={"rollout_correction": None}))
    # the oracle: the learner's current weights in a plain float64 HF model
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-model", dtype=torch.float64,
                                                 attn_implementation="eager")
    model.load_state_dict({k: v.double() for k, v in learner.weights().items()})
    with torch.no_grad():
        logits = model.eval()(input_ids=plain.input_ids, attention_mask=plain.attention_mask).logits[:, :-1]
    now = logits.gather(-1, plain.input_ids[:, 1:, None]).squeeze(-1) - logits.logsumexp(-1)
    on = plain.response_mask != 0
    behaviour = torch.tensor([lp for r in rollouts for lp in r.response_logprobs], dtype=torch.float64)
    ratio = (now[on] - behaviour).exp()
    assert ratio.max() > 1.2 * cap and ratio.min() < 0.8  # the policy moved: some weights capped, some far below 1
    want = ratio.clamp(max=cap)
    informative = plain.advantages[on].abs() > 1e-3
    got = (corrected.advantages[on] / plain.advantages[on]).double()
    assert torch.allclose(got[informative], want[informative], rtol=1e-3), (got - want).abs().max()


ASYNC = {"rollout": {**RLVR_DEMO["rollout"], "max_staleness": 1},
         "algorithm": {**RLVR_DEMO["algorithm"], "rollout_correction": {"upper": 2.0}}}


def _assert_bounded_staleness(history: list[dict], k: int, batch: int) -> None:
    """Every step trained one whole job, its own, none of whose samples was more than `k` versions old."""
    steps = [m for m in history if m["step"] > 0]
    assert [m["rollout/job"] for m in steps] == [m["step"] - 1 for m in steps]
    assert all(m["rollout/trained"] == batch and 0 <= m["rollout/staleness_max"] <= k for m in steps)


def test_staleness_1_learns_on_the_demo(tmp_path):
    """The README demo with generation one step ahead of the learner. Offline over seeds 0-2
    (bench/async_rl.py --part demo) every assertion below held on every seed (the tightest: seed
    1's train reward dipped to 0.19 at step 87 and recovered, where the synchronous demo test asks
    0.2; seed 2's held-out gain was +0.086 where +0.078 was needed); seed 0 runs here."""
    r = run_job(rlvr(tmp_path, **ASYNC))
    h = r.history
    series = lambda key: [m[key] for m in h if key in m]  # noqa: E731
    _assert_bounded_staleness(h, 1, 64)
    # from the second step on, every trained sample came from the weights one version back: the
    # rollouts really were generated while the learner updated
    assert all(m["rollout/staleness_mean"] == 1 for m in h[2:]) and sum(series("rollout/dropped")) == 0
    assert 0 < min(series("rollout/is_weight_mean")) and max(series("rollout/is_capped_frac")) < 0.5
    evals = series("eval/target_reward")
    assert sum(evals[-2:]) / 2 >= evals[0] + min(0.1, (1 - evals[0]) / 2), evals
    assert min(series("reward/reward_mean")) > 0.15  # never collapsed to zero reward
    assert sum(series("reward/response_len")[-10:]) / 10 < 6.0


def test_async_job_survives_a_killed_rollout_worker(tmp_path):
    """Killed while the next step's rollouts are in flight: the job finishes, every step trains its
    own job once, and nothing older than the staleness bound is trained."""
    killed = []

    def kill_once(m):
        if m["step"] == 2 and not killed:
            killed.append(kill_rollout_worker())

    r = run_job(rlvr(tmp_path, steps=4, eval_every=4, warm_start_sft_steps=4, **ASYNC), on_metrics=kill_once)
    assert killed and r.steps == 4
    assert [m["step"] for m in r.history] == [0, 1, 2, 3, 4]
    _assert_bounded_staleness(r.history, 1, 64)


def test_partial_rollouts_job(tmp_path):
    """`partial_rollouts`: weights reach the workers as offers, every generate names its version, and
    a sequence's tokens may span versions; the staleness bound holds on the oldest token, and the
    tokens are never older than their sequence."""
    rollout = {**ASYNC["rollout"], "partial_rollouts": True, "partial_chunk_tokens": 2}
    r = run_job(rlvr(tmp_path, steps=4, eval_every=4, warm_start_sft_steps=4,
                     rollout=rollout, algorithm=ASYNC["algorithm"]))
    assert r.steps == 4
    _assert_bounded_staleness(r.history, 1, 64)
    steps = [m for m in r.history if m["step"] > 0]
    assert all(0 <= m["rollout/token_staleness_mean"] <= m["rollout/staleness_mean"]
               and 0 <= m["rollout/partial_frac"] <= 1 for m in steps)
    assert "eval/target_reward" in r.history[-1]


class _Crash(Exception):
    pass


def test_async_resume_trains_the_saved_rollouts(tmp_path):
    """A checkpoint saves the rollouts in flight (their prompts and samples); after a crash the
    resumed run trains exactly those, then continues as the uninterrupted run does: nothing lost or
    trained twice, so it ends on the uninterrupted run's weights."""
    spec = dict(steps=4, eval_every=4, warm_start_sft_steps=4, checkpoint={"every": 2, "keep": 2}, **ASYNC)
    run_job(rlvr(tmp_path / "a", **spec))
    crashed = []

    def crash(m):
        crashed.append(m)
        if m["step"] == 3:
            raise _Crash()

    with pytest.raises(_Crash):
        run_job(rlvr(tmp_path / "b", **spec), on_metrics=crash)
    states = [json.loads((tmp_path / x / "checkpoints" / "step_0000002" / "trainer.json").read_text()) for x in "ab"]
    assert [job["index"] for job in states[1]["pipeline"]] == [2]  # in flight at step 2: the next step's rollouts
    assert states[0]["general"] == states[1]["general"]
    resumed = run_job(rlvr(tmp_path / "b", **spec))
    assert [m["step"] for m in resumed.history] == [0, 1, 2, 3, 4]  # steps 0-2 from the checkpointed run's log
    # step 3 trained the saved rollouts: the crashed run's step 3 saw the very same samples
    for key in ("reward/reward_mean", "reward/response_len", "rollout/staleness_mean"):
        assert resumed.history[3][key] == crashed[-1][key], key
    _assert_bounded_staleness(resumed.history, 1, 64)
    fa, fb = (load_file(tmp_path / x / "model" / "model.safetensors") for x in "ab")
    assert max(float((fa[k] - fb[k]).abs().max()) for k in fa) < 1e-5
