"""Rollout engine: one vLLM `LLM` that samples responses, scores sequences and takes new weights in place.

`RolloutEngine` is a plain class (usable in-process, e.g. in a notebook); `RolloutWorker` is the same class as a Ray
actor and `make_rollout_workers` starts a pool of them. The engine always runs in-process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`): only then does `reload_weights` accept a weights iterator of tensors (in
multiprocess mode the tensors reach the engine core as lists and the reload fails), see docs/env.md 1c.

Log-probabilities are vLLM's "raw" ones (the model's softmax at temperature 1, before temperature/top-p), the same
quantity as the learner's `drpt_ray.lm_losses.token_logprobs`, so rollout and learner log-probs are directly comparable.

Restarts: Ray re-runs `__init__` on a restarted actor, so the engine comes back with the weights at `model_path`
and `weights_version` 0. Every `Rollout` carries the version that produced it: the rollout pipeline re-issues a share
that failed or came back from other weights after `WeightSync.resend` gave that worker the current weights
(drpt_ray/rollout/sync.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray
import torch
from ray.actor import ActorHandle

from drpt_ray.config import RolloutSpec, SamplingSpec
from drpt_ray.quiet import quiet_vllm
from drpt_ray.rollout.sync import AdapterWeights

if TYPE_CHECKING:
    from vllm import LLM, SamplingParams

# Key prefixes/fragments of a peft-wrapped model's state dict: vLLM would not recognise these names.
CPU_STEP_TOKENS = 4096  # tokens per engine step on CPU (vLLM's default budget)
_PEFT_MARKERS = ("base_model.model.", "lora_A", "lora_B")


@dataclass
class Rollout:
    """One sampled response.

    Attributes:
        prompt_index: Position of the prompt in the `generate` call (`n` rollouts share it).
        prompt_ids: Prompt token ids as the engine saw them.
        response_ids: Generated token ids (includes the eos token when generation stopped on it).
        response_logprobs: log p(response_ids[t] | prefix) under the engine's weights, one per response token.
        text: Detokenized response, special tokens skipped.
        finish_reason: "stop" (eos or stop token) or "length" (hit `max_new_tokens`).
        weights_version: `weights_version` of the engine that sampled it.
        engine_seconds: Wall seconds of the `generate` call that produced it (shared by the call's
            rollouts): the worker's busy time, from which the trainer reports rollout idle time.
        token_versions: Partial rollouts only: the weights version that sampled each response token
            (`weights_version` is then the first, the oldest); None when one version sampled them all.
    """

    prompt_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: list[float]
    text: str
    finish_reason: str
    weights_version: int
    engine_seconds: float = 0.0
    token_versions: list[int] | None = None


def engine_env(spec: RolloutSpec) -> dict[str, str]:
    """Environment variables vLLM must see before it is imported (they are read at import/engine start)."""
    return {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process engine: required by the weights-iterator reload
        "VLLM_CPU_KVCACHE_SPACE": str(spec.kv_cache_gib),  # else vLLM takes ~90% of RAM for the KV cache on CPU
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),  # per-step INFO lines drown the job log
        # c10's start-up warnings (NUMA memory binding, once per engine); its errors still print
        "TORCH_CPP_LOG_LEVEL": os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR"),
    }


def _sampling_params(sampling: SamplingSpec) -> SamplingParams:
    from vllm import SamplingParams

    return SamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_tokens=sampling.max_new_tokens,
        seed=sampling.seed,
        logprobs=0,  # 0 top alternatives: vLLM still returns the sampled token's log-prob
    )


def _as_inputs(prompts: list[str] | list[list[int]]) -> list[Any]:
    """Strings pass through (vLLM tokenizes them); token-id lists become `TokensPrompt`s."""
    from vllm.inputs import TokensPrompt

    return [p if isinstance(p, str) else TokensPrompt(prompt_token_ids=list(p)) for p in prompts]


def _check_plain_hf(state_dict: dict[str, torch.Tensor]) -> None:
    """Fail before touching the engine: a partial load of unknown names would leave the model half-updated."""
    bad = [k for k in state_dict if any(m in k for m in _PEFT_MARKERS)]
    if bad:
        raise ValueError(
            f"update_weights needs plain Hugging Face names of the full weights, got peft keys such as {bad[0]!r}; "
            "pass the merged weights (e.g. the state_dict of `merge_and_unload()` on a copy of the model)"
        )


class RolloutEngine:
    """A vLLM engine for rollouts: sample, score, and reload weights in place.

    On CPU (no CUDA device visible) the engine runs in float32 with `enforce_eager=True` (bf16 selects an AMX
    kernel that crashes on short prompts; compilation costs ~30 s per start). On GPU it uses the model's dtype
    and `spec.gpu_memory_utilization`.

    Args:
        model_path: Hugging Face model directory (the one the learner loads, see `drpt_ray.models.model_dir`).
        spec: Engine sizing; only the engine fields are used here (sampling comes with each `generate` call).
        seed: Engine seed (sampling of requests without their own seed).
        lora_rank: Serve LoRA adapters of up to this rank (`AdapterWeights` from `update_weights`, one at a
            time, on the base weights at `model_path`); None: full-weight reloads only.
    """

    def __init__(self, model_path: str, spec: RolloutSpec, seed: int = 0, lora_rank: int | None = None) -> None:
        os.environ.update(engine_env(spec))
        quiet_vllm(os.environ["VLLM_LOGGING_LEVEL"], Path(tempfile.mkdtemp(prefix="drpt-engine-")))
        from vllm import LLM  # after the env update: vLLM reads these variables

        self.model_path = str(model_path)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # CPU: no chunked prefill. A seeded request whose prompt is split across scheduler steps makes
        # vLLM rewind its generator's offset, which a CPU generator does not have ("CPU Generator does
        # not use offset": seen with 128 GSM8K prompts over the 4096-token step budget). Unchunked,
        # a prompt waits for a step with room, so the budget must hold the longest one.
        device_kwargs: dict[str, Any] = (
            {"gpu_memory_utilization": spec.gpu_memory_utilization}
            if self.device == "cuda"
            else {"dtype": "float32", "enforce_eager": True, "enable_chunked_prefill": False,
                  "max_num_batched_tokens": max(spec.max_model_len, CPU_STEP_TOKENS)}
        )
        if lora_rank is not None:
            device_kwargs |= {"enable_lora": True, "max_lora_rank": lora_rank, "max_loras": 1}
        start = time.perf_counter()
        self._llm: LLM = LLM(model=self.model_path, max_model_len=spec.max_model_len, seed=seed,
                             use_tqdm_on_load=False, **device_kwargs)
        self._lora = None  # the LoRARequest every generation runs with (adapter sync), None: the base weights
        self._adapter_dir = Path(tempfile.mkdtemp(prefix="drpt-adapter-")) if lora_rank is not None else None
        self.max_model_len = spec.max_model_len
        # Every in-place reload warns "RotaryEmbedding: Failed to load weights": the rotary cache has no
        # checkpoint weights to load, and outputs after a reload match the learner (tests/test_rollout.py).
        # Set after the engine starts: vLLM's logging setup resets child loggers' levels.
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
        self.start_seconds = time.perf_counter() - start
        self.weights_version = 0
        self.n_generated = 0
        # Partial rollouts: weights offered while a generation runs (`offer_weights`, another thread),
        # taken by the generating thread at its next chunk boundary.
        self._offered: tuple[int, dict[str, torch.Tensor]] | None = None
        self._offer_cond = threading.Condition()

    def generate(self, prompts: list[str] | list[list[int]], sampling: SamplingSpec, min_version: int = 0,
                 chunk_tokens: int | None = None) -> list[Rollout]:
        """Sample `sampling.n` responses per prompt.

        Args:
            prompts: Raw strings (no chat template is applied) or token-id lists.
            sampling: Temperature, top-p, length, group size `n` and optional seed.
            min_version: Wait until weights of at least this version were offered (`offer_weights`) or
                loaded, and start with the newest.
            chunk_tokens: Partial rollouts: generate this many tokens at a time and take newer offered
                weights between chunks, so a sequence continues under them (each token's version is
                recorded). None: the whole response under one version.

        Returns:
            `len(prompts) * sampling.n` rollouts, grouped by prompt in input order.
        """
        self._take_offered(min_version)  # before the clock: waiting for weights is not generating
        start = time.perf_counter()
        if chunk_tokens is not None:
            rollouts = self._generate_in_chunks(prompts, sampling, chunk_tokens)
        else:
            outputs = self._generate(_as_inputs(prompts), _sampling_params(sampling))
            rollouts = [
                Rollout(
                    prompt_index=i,
                    prompt_ids=list(out.prompt_token_ids),
                    response_ids=list(c.token_ids),
                    response_logprobs=[lp[tok].logprob for tok, lp in zip(c.token_ids, c.logprobs)],
                    text=c.text,
                    finish_reason=str(c.finish_reason),
                    weights_version=self.weights_version,
                )
                for i, out in enumerate(outputs)
                for c in out.outputs
            ]
        seconds = time.perf_counter() - start
        for r in rollouts:
            r.engine_seconds = seconds
        self.n_generated += len(rollouts)
        return rollouts

    def _generate_in_chunks(self, prompts: list[str] | list[list[int]], sampling: SamplingSpec,
                            chunk: int) -> list[Rollout]:
        """Partial rollouts: the first chunk samples `n` responses per prompt; each unfinished one then
        continues alone from its prompt + response so far, `chunk` tokens at a time, under the newest
        offered weights. A continuation is seeded from the sampling seed, the chunk and the sequence."""
        first_chunk = sampling.model_copy(update={"max_new_tokens": min(chunk, sampling.max_new_tokens)})
        first = self._generate(_as_inputs(prompts), _sampling_params(first_chunk))
        seqs = [{"i": i, "prompt": list(out.prompt_token_ids), "ids": [], "lps": [], "versions": [], "finish": None}
                for i, out in enumerate(first) for _ in out.outputs]
        outputs = [c for out in first for c in out.outputs]
        todo, round_ = seqs, 0
        while True:
            for s, c in zip(todo, outputs):
                s["ids"] += list(c.token_ids)
                s["lps"] += [lp[tok].logprob for tok, lp in zip(c.token_ids, c.logprobs)]
                s["versions"] += [self.weights_version] * len(c.token_ids)
                full = (len(s["ids"]) >= sampling.max_new_tokens
                        or len(s["prompt"]) + len(s["ids"]) >= self.max_model_len)
                if str(c.finish_reason) != "length" or full:
                    s["finish"] = str(c.finish_reason)
            todo = [s for s in seqs if s["finish"] is None]
            if not todo:
                break
            round_ += 1
            self._take_offered()  # the chunk boundary: newer weights take over from here
            params = [_sampling_params(sampling.model_copy(update={
                "n": 1, "max_new_tokens": min(chunk, sampling.max_new_tokens - len(s["ids"])),
                "seed": None if sampling.seed is None else sampling.seed + 7919 * round_ + 104_729 * k}))
                for k, s in enumerate(todo)]
            outs = self._generate(_as_inputs([s["prompt"] + s["ids"] for s in todo]), params)
            outputs = [out.outputs[0] for out in outs]
        decode = self._llm.get_tokenizer().decode
        return [Rollout(prompt_index=s["i"], prompt_ids=s["prompt"], response_ids=s["ids"], response_logprobs=s["lps"],
                        text=decode(s["ids"], skip_special_tokens=True), finish_reason=s["finish"],
                        weights_version=s["versions"][0] if s["versions"] else self.weights_version,
                        token_versions=s["versions"])
                for s in seqs]

    def offer_weights(self, state_dict: dict[str, torch.Tensor] | AdapterWeights, version: int) -> None:
        """Newer weights for the engine to take at its next safe point: a chunk boundary of the
        generation in progress (partial rollouts) or the start of the next call. Meant to run beside
        `generate` (`PartialRolloutWorker`'s `control` concurrency group): it only stores them."""
        if not isinstance(state_dict, AdapterWeights):
            _check_plain_hf(state_dict)
        with self._offer_cond:
            if self._offered is None or version > self._offered[0]:
                self._offered = (version, state_dict)
            self._offer_cond.notify_all()

    def _take_offered(self, min_version: int = 0, timeout: float = 600.0) -> None:
        """Load the newest offered weights, first waiting (up to `timeout` s) until some of at least
        `min_version` were offered when the loaded ones are older."""
        def ready() -> bool:
            return max(self.weights_version, self._offered[0] if self._offered else -1) >= min_version

        with self._offer_cond:
            if not self._offer_cond.wait_for(ready, timeout):
                raise TimeoutError(f"no weights of version >= {min_version} offered within {timeout:.0f} s")
            offered, self._offered = self._offered, None
        if offered is not None and offered[0] > self.weights_version:
            self.update_weights(offered[1], offered[0])

    def logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        """Score given sequences: log p(response[t] | prompt, response[:t]) under the current weights.

        Runs each prompt+response as one prefill with `prompt_logprobs=0` (the scored token's log-prob is
        always returned) and generates a single throw-away token.

        Args:
            prompt_ids: One non-empty token-id list per sequence.
            response_ids: The matching response token ids.

        Returns:
            One list of `len(response_ids[i])` log-probs per sequence.
        """
        from vllm import SamplingParams

        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every prompt needs at least one token (the first token has no log-prob)")
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        sequences = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
        outputs = self._generate(_as_inputs(sequences), params)
        return [
            [out.prompt_logprobs[t][seq[t]].logprob for t in range(len(p), len(seq))]
            for out, seq, p in zip(outputs, sequences, prompt_ids)
        ]

    def update_weights(self, state_dict: dict[str, torch.Tensor] | AdapterWeights, version: int | None = None) -> float:
        """Load new weights into the running engine, without restarting it.

        Args:
            state_dict: Plain Hugging Face names and full tensors, e.g. `model.state_dict()` of the learner's
                `AutoModelForCausalLM` (for a peft model: the merged weights, not the adapter state); or, on an
                engine started with `lora_rank`, an `AdapterWeights`: it replaces the adapter every later
                generation runs with, on the unchanged base weights.
            version: The learner's version of these weights (e.g. its step); None increments the current one.
                Passing it makes a retried call after an actor restart land on the right version.

        Returns:
            Seconds spent reloading.

        vLLM logs "RotaryEmbedding: Failed to load weights" on every full reload: the rotary cache is computed,
        not loaded, and is left as it is (harmless).
        """
        start = time.perf_counter()
        version = self.weights_version + 1 if version is None else version
        if isinstance(state_dict, AdapterWeights):
            self._load_adapter(state_dict, version)
        else:
            _check_plain_hf(state_dict)
            self._llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state_dict.items())})
        # Cached KV blocks were computed with the old weights; reusing them would mix two policies.
        self._llm.reset_prefix_cache()
        self.weights_version = version
        return time.perf_counter() - start

    def _load_adapter(self, adapter: AdapterWeights, version: int) -> None:
        """Write the adapter as a PEFT directory (what a LoRARequest loads) and make it the one every
        generation uses; the previous one is unloaded and its files removed."""
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        if self._adapter_dir is None:
            raise ValueError("adapter weights for an engine started without LoRA: start it with lora_rank "
                             "(rollout.lora_adapter_sync)")
        path = self._adapter_dir / f"v{version}"
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in adapter.tensors.items()}, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps(adapter.config, default=list))
        old, self._lora = self._lora, LoRARequest(f"drpt-v{version}", version + 1, str(path))
        if old is not None:
            self._llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)
        self._llm.llm_engine.add_lora(self._lora)

    def _generate(self, inputs: list, params):
        """vLLM's generate with the current adapter, if any."""
        return self._llm.generate(inputs, params, use_tqdm=False, lora_request=self._lora)

    def health(self) -> dict[str, Any]:
        """Liveness and sync state: answering at all means the engine was built and the actor is responsive."""
        return {
            "ok": True,
            "model": self.model_path,
            "device": self.device,
            "weights_version": self.weights_version,
            "n_generated": self.n_generated,
            "start_seconds": self.start_seconds,
            "pid": os.getpid(),
        }


RolloutWorker = ray.remote(RolloutEngine)
# Partial rollouts: `offer_weights` runs in the `control` group beside a `generate` in progress. A
# threaded actor does not keep submission order between calls, so weights reach it only as offers
# and each `generate` names the version it needs (`min_version`).
PartialRolloutWorker = ray.remote(concurrency_groups={"control": 1})(RolloutEngine)

# A call that was running when its actor died is retried once on the restarted actor: enough for a transient
# death (OOM kill, lost node), while an input that crashes the engine deterministically fails fast instead of
# burning every restart.
_MAX_TASK_RETRIES = 1


def make_rollout_workers(model_path: str, spec: RolloutSpec, seed: int,
                         lora_rank: int | None = None) -> list[ActorHandle]:
    """Start `spec.num_workers` `RolloutWorker` actors (returns at once; engines start in the background).

    Each worker reserves `spec.num_cpus_per_worker` CPUs and `spec.num_gpus_per_worker` GPUs, is restarted up to
    `spec.max_restarts` times, and gets the vLLM environment through `runtime_env`. Worker i uses seed `seed + i`
    so that workers do not draw identical samples. A restarted worker is back at the initial weights
    (`weights_version` 0): re-sync it with `drpt_ray.rollout.sync.WeightSync.resend`.

    Wait for readiness with `ray.get([w.health.remote() for w in workers], timeout=...)`.
    """
    options = dict(
        num_cpus=spec.num_cpus_per_worker,
        num_gpus=spec.num_gpus_per_worker,
        max_restarts=spec.max_restarts,
        # Partial rollouts: not retried. A restarted worker has lost the offered weights, so a retried
        # call would wait for a version nobody offers again; failing at once lets the rollout pipeline re-sync
        # the worker and re-issue the share (RolloutPipeline._reissue).
        max_task_retries=0 if spec.partial_rollouts else _MAX_TASK_RETRIES,
        runtime_env={"env_vars": engine_env(spec)},
    )
    cls = PartialRolloutWorker if spec.partial_rollouts else RolloutWorker
    return [cls.options(**options).remote(model_path, spec, seed + i, lora_rank) for i in range(spec.num_workers)]

