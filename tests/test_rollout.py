"""Rollout workers on a real local Ray cluster with a real vLLM CPU engine and the tiny model.

One Ray cluster and one worker are shared by the whole module (an engine start inside an actor takes ~20 s);
the kill/restart test runs last because it resets the worker's weights. Timings are printed (`pytest -s`).
"""

from __future__ import annotations

import math
import time

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from drpt_ray.config import RolloutSpec, SamplingSpec, TinyModelSpec
from drpt_ray.lm_losses import token_logprobs
from drpt_ray.models import tiny_model
from drpt_ray.rollout import AdapterWeights, RolloutEngine, WeightSync, make_rollout_workers

pytestmark = pytest.mark.slow

# vLLM (CPU kernels, float32) vs transformers (eager attention, float32) on the same weights: measured max abs
# difference 4.8e-7 (2 runs, scored and sampled alike); a 0.02-std weight perturbation moves log-probs by ~0.6.
LOGPROB_TOL = 1e-3
START_TIMEOUT_S = 240

PROMPTS = [
    "The quick brown fox",
    "Question: what is 2 + 3? Answer:",
    "Once upon a time",
    "We train the policy with",
    "Please think step by step",
    "The weather was cold, so",
    "A model learns from data",
    "Good answers are short",
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tiny_model(tmp_path_factory.mktemp("rollout") / "tiny", TinyModelSpec()))


@pytest.fixture(scope="module")
def tokenizer(model_path: str):
    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="module")
def worker(model_path: str):
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        start = time.perf_counter()
        (handle,) = make_rollout_workers(model_path, RolloutSpec(num_workers=1, max_restarts=1), seed=0)
        health = ray.get(handle.health.remote(), timeout=START_TIMEOUT_S)
        print(
            f"\nworker ready in {time.perf_counter() - start:.1f} s incl. actor spawn "
            f"(engine start {health['start_seconds']:.1f} s)"
        )
        yield handle
    finally:
        ray.shutdown()


def _hf_model(model_path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="eager").eval()


@torch.no_grad()
def _hf_logprobs(model: torch.nn.Module, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """The learner's log p(response[t] | prefix), float64 for comparison."""
    ids = torch.tensor([prompt_ids + response_ids])
    return token_logprobs(model, ids, torch.ones_like(ids))[0, len(prompt_ids) - 1 :].double()


def _max_diff(a: list[float], b: torch.Tensor) -> float:
    return (torch.tensor(a, dtype=torch.float64) - b).abs().max().item()


def test_generate_n_responses_with_logprobs_and_text(worker, tokenizer):
    sampling = SamplingSpec(n=3, max_new_tokens=16, temperature=1.0, seed=0)
    rollouts = ray.get(worker.generate.remote(PROMPTS, sampling), timeout=60)

    assert len(rollouts) == len(PROMPTS) * sampling.n
    assert [r.prompt_index for r in rollouts] == [i for i in range(len(PROMPTS)) for _ in range(sampling.n)]
    for r in rollouts:
        assert r.prompt_ids == tokenizer(PROMPTS[r.prompt_index]).input_ids
        assert 1 <= len(r.response_ids) <= sampling.max_new_tokens
        assert len(r.response_logprobs) == len(r.response_ids)
        assert all(math.isfinite(v) and v <= 0.0 for v in r.response_logprobs)
        assert r.finish_reason in ("stop", "length")
        assert r.weights_version == 0

    # Throughput, 8 prompts x 16 tokens: ignore_eos is not exposed, so count the tokens actually generated.
    start = time.perf_counter()
    timed = ray.get(worker.generate.remote(PROMPTS, SamplingSpec(n=1, max_new_tokens=16, seed=1)), timeout=60)
    seconds = time.perf_counter() - start
    tokens = sum(len(r.response_ids) for r in timed)
    print(f"\ngenerate 8 prompts x <=16 tokens: {tokens} tokens in {seconds:.3f} s = {tokens / seconds:.0f} tok/s")


def test_seeded_sampling_over_the_step_token_budget(worker, tokenizer):
    """More prompt tokens than one engine step takes (4096 on CPU), sampled with a seed: with chunked
    prefill a split prompt made vLLM rewind its CPU generator's offset and the engine died
    (RuntimeError "CPU Generator does not use offset", GSM8K evaluation on SmolLM2). The same seed
    still gives the same responses."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, tokenizer.vocab_size, (200,), generator=g).tolist() for _ in range(24)]
    sampling = SamplingSpec(n=2, max_new_tokens=8, temperature=1.0, seed=3)
    first, again = (ray.get(worker.generate.remote(prompts, sampling), timeout=120) for _ in range(2))
    assert len(first) == 48 and all(r.response_ids for r in first)
    assert [r.response_ids for r in first] == [r.response_ids for r in again]


def test_logprobs_match_hf_before_and_after_weight_update(worker, model_path, tokenizer):
    prompt = tokenizer("Question: what is the answer? Answer:").input_ids
    (rollout,) = ray.get(worker.generate.remote([prompt], SamplingSpec(n=1, max_new_tokens=16, seed=3)), timeout=60)
    response = rollout.response_ids
    assert rollout.prompt_ids == prompt and len(response) >= 2

    hf = _hf_model(model_path)
    hf_old = _hf_logprobs(hf, prompt, response)
    (scored_old,) = ray.get(worker.logprobs.remote([prompt], [response]), timeout=60)
    diff_scored = _max_diff(scored_old, hf_old)
    diff_sampled = _max_diff(rollout.response_logprobs, hf_old)
    print(f"\nvLLM vs HF logprobs, initial weights: scored {diff_scored:.2e}, sampled {diff_sampled:.2e}")
    assert diff_scored < LOGPROB_TOL
    assert diff_sampled < LOGPROB_TOL

    # New policy: every weight perturbed by noise of the init scale (std 0.02).
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for p in hf.parameters():
            p.add_(0.02 * torch.randn_like(p))
    hf_new = _hf_logprobs(hf, prompt, response)
    t0 = time.perf_counter()
    WeightSync([worker]).push(ray.put({k: v.detach() for k, v in hf.state_dict().items()}))
    sync_seconds = time.perf_counter() - t0

    (scored_new,) = ray.get(worker.logprobs.remote([prompt], [response]), timeout=60)
    diff_new = _max_diff(scored_new, hf_new)
    moved = _max_diff(scored_new, hf_old)
    print(f"after update ({sync_seconds:.3f} s sync): vs new HF {diff_new:.2e}, vs old HF {moved:.2e}")
    assert diff_new < LOGPROB_TOL
    assert moved > 100 * LOGPROB_TOL

    # Sampling also uses the new weights: the sampled tokens' log-probs are the new model's.
    greedy = SamplingSpec(n=1, max_new_tokens=16, temperature=0.0)
    (after,) = ray.get(worker.generate.remote([prompt], greedy), timeout=60)
    assert after.weights_version == 1
    assert _max_diff(after.response_logprobs, _hf_logprobs(hf, prompt, after.response_ids)) < LOGPROB_TOL

    health = ray.get(worker.health.remote(), timeout=30)
    assert health["ok"] and health["weights_version"] == 1 and health["model"] == model_path


def test_partial_rollout_continues_under_weights_offered_mid_generation(worker, model_path, tokenizer):
    """Partial rollouts: weights offered while a generation runs take over at its next chunk
    boundary. The offer is made at the first boundary by an engine subclass (deterministic; in a job
    it comes from `WeightSync.offer`, on the actor's control thread). Oracle: each token's log-prob
    is that of the HF model with the weights its recorded version names."""
    hf_old = _hf_model(model_path)
    hf_new = _hf_model(model_path)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for p in hf_new.parameters():
            p.add_(0.02 * torch.randn_like(p))
    new_weights = {k: v.detach().clone() for k, v in hf_new.state_dict().items()}

    class OfferAtFirstBoundary(RolloutEngine):  # defined here: Ray ships a local class by value
        def stage(self, weights: dict) -> None:
            self.staged, self.calls = weights, 0

        def _take_offered(self, min_version: int = 0, timeout: float = 600.0) -> None:
            self.calls += 1
            if self.calls == 2:  # the first chunk boundary (call 1 is the start of `generate`)
                self.offer_weights(self.staged, 1)
            super()._take_offered(min_version, timeout)

    actor = ray.remote(OfferAtFirstBoundary).options(num_cpus=1).remote(
        model_path, RolloutSpec(partial_rollouts=True), 0)
    ray.get(actor.stage.remote(new_weights), timeout=START_TIMEOUT_S)
    chunk = 4
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS[:4]]
    rollouts = ray.get(actor.generate.remote(prompts, SamplingSpec(n=2, max_new_tokens=12, temperature=1.0, seed=5),
                                             0, chunk), timeout=120)
    assert len(rollouts) == 8 and any(len(r.response_ids) > chunk for r in rollouts)
    for r in rollouts:
        n = len(r.response_ids)
        assert r.weights_version == 0 and r.token_versions == [0] * min(chunk, n) + [1] * max(0, n - chunk)
        prompt = prompts[r.prompt_index]
        old, new = _hf_logprobs(hf_old, prompt, r.response_ids), _hf_logprobs(hf_new, prompt, r.response_ids)
        assert _max_diff(r.response_logprobs[:chunk], old[:chunk]) < LOGPROB_TOL
        if n > chunk:
            assert _max_diff(r.response_logprobs[chunk:], new[chunk:]) < LOGPROB_TOL
            assert _max_diff(r.response_logprobs[chunk:], old[chunk:]) > 100 * LOGPROB_TOL  # the weights really changed
    assert ray.get(actor.health.remote(), timeout=30)["weights_version"] == 1
    ray.kill(actor)


def _adapter(model, seed: int) -> AdapterWeights:
    """The PEFT model's adapter after perturbing its B matrices (they start at zero), as the learner sends it."""
    from peft import get_peft_model_state_dict

    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for n, prm in model.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.05)
    tensors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return AdapterWeights(tensors, model.peft_config["default"].to_dict())


def test_adapter_only_sync_serves_the_peft_model_and_survives_a_restart(model_path, tokenizer):
    """`rollout.lora_adapter_sync`: an engine started with a LoRA rank takes the adapter alone
    (`AdapterWeights` through WeightSync) and then samples and scores as transformers' PEFT model
    does (greedy tokens equal, log-probs within LOGPROB_TOL); a second adapter replaces the first;
    a killed worker comes back on the base weights and `resend` gives it the current adapter."""
    from peft import LoraConfig, get_peft_model

    actor = make_rollout_workers(model_path, RolloutSpec(num_workers=1, max_restarts=1), seed=0, lora_rank=8)[0]
    peft_model = get_peft_model(_hf_model(model_path), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    prompt = tokenizer("Question: what is the answer? Answer:").input_ids
    greedy = SamplingSpec(n=1, max_new_tokens=12, temperature=0.0)
    sync = WeightSync([actor])
    try:
        ray.get(actor.health.remote(), timeout=START_TIMEOUT_S)
        (base,) = ray.get(actor.generate.remote([prompt], greedy), timeout=60)
        for version, seed in ((1, 0), (2, 1)):
            sync.push(ray.put(_adapter(peft_model, seed)))
            (out,) = ray.get(actor.generate.remote([prompt], greedy), timeout=60)
            ids = torch.tensor([prompt])
            with torch.no_grad():
                hf = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=12, min_new_tokens=len(out.response_ids),
                                         pad_token_id=tokenizer.pad_token_id or 0)
            assert out.weights_version == version
            assert out.response_ids == hf[0, len(prompt):len(prompt) + len(out.response_ids)].tolist()
            want = _hf_logprobs(peft_model, prompt, out.response_ids)
            assert _max_diff(out.response_logprobs, want) < LOGPROB_TOL
            (scored,) = ray.get(actor.logprobs.remote([prompt], [base.response_ids]), timeout=60)
            assert _max_diff(scored, _hf_logprobs(peft_model, prompt, base.response_ids)) < LOGPROB_TOL
        # the adapter really moved the policy: the base model's tokens score differently now
        assert _max_diff(scored, _hf_logprobs(_hf_model(model_path), prompt, base.response_ids)) > 100 * LOGPROB_TOL

        pid = ray.get(actor.health.remote(), timeout=30)["pid"]
        ray.kill(actor, no_restart=False)
        deadline = time.perf_counter() + START_TIMEOUT_S
        while (health := ray.get(actor.health.remote(), timeout=START_TIMEOUT_S))["pid"] == pid:
            assert time.perf_counter() < deadline
            time.sleep(0.5)
        assert health["weights_version"] == 0
        sync.resend(actor)
        (scored,) = ray.get(actor.logprobs.remote([prompt], [base.response_ids]), timeout=60)
        assert ray.get(actor.health.remote(), timeout=30)["weights_version"] == 2
        assert _max_diff(scored, _hf_logprobs(peft_model, prompt, base.response_ids)) < LOGPROB_TOL
    finally:
        ray.kill(actor)


def test_killed_worker_restarts_with_initial_weights(worker, model_path, tokenizer):
    before = ray.get(worker.health.remote(), timeout=30)
    start = time.perf_counter()
    ray.kill(worker, no_restart=False)
    # ray.kill is asynchronous: a call may still reach the old process, so poll until the pid changes.
    # Calls made while the actor restarts queue until the new engine is up; the deadline bounds a failed restart.
    while True:
        after = ray.get(worker.health.remote(), timeout=START_TIMEOUT_S)
        if after["pid"] != before["pid"] or time.perf_counter() - start > START_TIMEOUT_S:
            break
        time.sleep(0.5)
    print(f"\nrestart after kill: health again in {time.perf_counter() - start:.1f} s")

    assert after["ok"] and after["pid"] != before["pid"]
    # Ray re-ran __init__: the engine is back at the weights on disk, and says so.
    assert after["weights_version"] == 0 and after["n_generated"] == 0
    prompt = tokenizer("The quick brown fox").input_ids
    response = tokenizer(" jumps over the lazy dog.").input_ids
    (scored,) = ray.get(worker.logprobs.remote([prompt], [response]), timeout=60)
    assert _max_diff(scored, _hf_logprobs(_hf_model(model_path), prompt, response)) < LOGPROB_TOL
