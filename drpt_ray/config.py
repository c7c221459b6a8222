"""The one schema: pydantic models shared by the REST API, the CLI, the library and Ray Tune.

Every default lives here, once. Unknown keys are rejected (`extra="forbid"`) so a typo in a YAML
file or a request body is an error that names the dotted field path, never a silently ignored
setting. Values are never coerced: `steps: true` or `steps: "30"` is an error, not 1 or 30 (an int
is still a valid float: `lr: 1`), floats must be finite, integers fit in 32 bits, and a YAML file
that repeats a key is refused.
"""

from __future__ import annotations

import functools
import math
import re
import typing
from pathlib import Path
from typing import Annotated, Literal

import annotated_types
import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from drpt_ray.feasible_sets import FEASIBLE_SETS, Granularity


INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1  # SQLite's INTEGER; offsets and event ids in the REST API stop here
NAME_MAX_LEN = 200  # a job's or sweep's `name`: the control plane's name column is VARCHAR(200)
MAX_SEARCH_VALUES = 1000  # values of one sweep dimension; each is validated at submission
MAX_SWEEP_TRIALS = 100_000  # trials of any sweep, checked before its values are (a server may allow fewer)

# Every integer setting fits 32 bits: steps end up in the control plane's Integer columns (int32 on
# Postgres), and no count or size is meaningful beyond that.
Int = Annotated[int, annotated_types.Le(INT32_MAX)]
# A Field(le=...) on an Int does not tighten Int's own bound (pydantic keeps the type's), so a
# tighter bound is a type of its own.
# rollout or learner workers of one job: beyond any cluster's, and a plan of them stays cheap to build
MAX_WORKERS = 4096
WorkerCount = Annotated[int, annotated_types.Ge(1), annotated_types.Le(MAX_WORKERS)]
PoolSize = Annotated[int, annotated_types.Ge(1), annotated_types.Le(1_000_000)]
Seed = Annotated[int, annotated_types.Ge(0), annotated_types.Le(INT32_MAX)]  # numpy takes 0 <= seed < 2**32


class Spec(BaseModel):
    """Base for every config model: unknown fields fail, assignments are validated, nothing is
    coerced (strict: no bool or str for a number, no number for a bool), and NaN / +-inf are refused
    (a NaN learning rate trains to a NaN loss; JSON cannot even carry it)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_nul(cls, v, info):
        # Text with a NUL cannot be stored by Postgres (the control plane keeps every spec) nor passed
        # in a process's environment or argv (a job's spec travels in both). A nested spec checks its
        # own fields, so the error names the exact path.
        if _has_nul(v) and not _holds_spec(cls.model_fields[info.field_name].annotation):
            raise ValueError("text may not contain a NUL character (\\x00)")
        return v


@functools.lru_cache(maxsize=None)  # annotations are few and hashable; this runs for every field validated
def _holds_spec(annotation) -> bool:
    """Whether a field's type is, or contains, a Spec model."""
    if isinstance(annotation, type) and issubclass(annotation, Spec):
        return True
    return any(_holds_spec(a) for a in typing.get_args(annotation))


def _has_nul(v) -> bool:
    if isinstance(v, (bool, int, float)) or v is None:  # most values: return at once
        return False
    if isinstance(v, str):
        return "\x00" in v
    if isinstance(v, dict):
        return any(_has_nul(k) or _has_nul(x) for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return any(_has_nul(x) for x in v)
    return False


# --------------------------------------------------------------------------------------------
# Model


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's max_lora_rank choices


class LoraSpec(Spec):
    r: Int = Field(8, ge=1, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names (suffixes) that get adapters, or 'all-linear'."
    )


class TinyModelSpec(Spec):
    """A small random model built in code (no download), for tests, demos and benchmarks."""

    arch: Literal["llama", "qwen2"] = Field("llama", description="Architecture family.")
    hidden_size: Int = Field(64, ge=16, description="Hidden width; head_dim must stay a multiple of 16 for vLLM CPU.")
    intermediate_size: Int = Field(128, ge=16, description="MLP width.")
    num_layers: Int = Field(2, ge=1, description="Decoder layers.")
    num_heads: Int = Field(2, ge=1, description="Attention heads.")
    num_kv_heads: Int = Field(1, ge=1, description="Key/value heads (GQA).")
    seed: Seed = Field(0, description="Seed of the random weights.")

    @model_validator(mode="after")
    def _heads_divide(self) -> "TinyModelSpec":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        return self


class ModelSpec(Spec):
    path: str | None = Field(
        None, description="Local directory or hub name of a causal LM. None builds `tiny` in code."
    )
    tiny: TinyModelSpec = Field(default_factory=TinyModelSpec, description="Used when `path` is None.")
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = Field(
        "float32", description="Training dtype (vLLM on CPU needs float32)."
    )
    lora: LoraSpec | None = Field(None, description="Train LoRA adapters instead of all weights.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute each decoder layer's activations in the backward (less memory, ~1 more forward)."
    )


# --------------------------------------------------------------------------------------------
# Regularizer (method.md sections 1-3)

FEASIBLE_SET_NAMES = tuple(FEASIBLE_SETS.names())  # the registry's names (drpt_ray/feasible_sets.py)


class SketchSpec(Spec):
    kind: Literal["gaussian", "rademacher"] = Field("gaussian", description="Entries of the random factors.")
    dim: Int = Field(64, ge=1, description="Sketch size k per factor (k*k per layer); identity when k >= dim.")
    seed: Seed = Field(0, description="Base seed; each layer and factor derives its own.")


class RegularizerSpec(Spec):
    """Which feasible set the general batch builds and how the target gradient is scored against it."""

    feasible_set: Literal[FEASIBLE_SET_NAMES] = Field(  # type: ignore[valid-type]
        "layerwise_subset",
        description=f"{' | '.join(FEASIBLE_SET_NAMES)} (iif: RL buffer filtering).",
    )
    selection: Literal["topk", "filter"] = Field(
        "topk", description="Subset rule: top-k by score, or keep non-negative scores (filtering)."
    )
    frac: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="topk: fraction kept (k = max(1, floor(frac*n))); filter: fraction of negatives dropped, most "
        "negative first.",
    )
    passes: Literal["one_pass", "two_pass"] = Field(
        "one_pass", description="global_subset only: assemble from retained (dY, X), or re-run backward on the subset."
    )
    tau: float = Field(
        1.0, gt=0.0, description="soft_subset temperature in units of the score std: inf -> full training, 0 -> top-1."
    )
    soft_granularity: Literal["layer", "global"] = Field(
        "layer", description="soft_subset: weights per weight matrix or shared by the whole model."
    )
    kernel: Literal["auto", "ghost", "direct", "sketch"] = Field(
        "auto", description="Score kernel; auto picks ghost or direct per layer by the memory crossover T < sqrt(O*I)."
    )
    sketch: SketchSpec = Field(default_factory=SketchSpec, description="Random sketch for kernel=sketch.")
    direct_chunk: Int = Field(4, ge=1, description="Examples per chunk when materialising per-example gradients.")
    target_mode: Literal["separate", "merged"] = Field(
        "separate", description="Target gradient from its own backward (cached) or from rows of the same batch."
    )
    refresh_every: Int = Field(1, ge=1, description="Steps between target-gradient recaptures.")
    hook_embeddings: bool = Field(False, description="Also curate nn.Embedding weights (gather-dot scores).")
    exclude: list[str] = Field(
        default_factory=list, description="Module-name substrings that are never hooked (they get ordinary gradients)."
    )

    @model_validator(mode="after")
    def _fits_the_feasible_set(self) -> "RegularizerSpec":
        fs = FEASIBLE_SETS.get(self.feasible_set)
        for name, allowed in (("passes", fs.passes), ("target_mode", fs.target_modes)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"regularizer.{name} {value!r} is not supported with feasible_set {fs.name!r}; "
                                 f"it runs with {name}: {' | '.join(allowed)}")
        return self


# --------------------------------------------------------------------------------------------
# Data


class ReasoningGymDataset(Spec):
    """One procedural dataset of the `reasoning-gym` package and its generator settings."""

    name: str = Field(description="A reasoning-gym dataset name (reasoning_gym.factory.DATASETS), e.g. chain_sum.")
    config: dict[str, int | float | str | bool] = Field(
        default_factory=dict,
        description="Its config dataclass's fields (difficulty knobs), e.g. {min_terms: 2, max_digits: 1}."
    )

    @model_validator(mode="after")
    def _known_to_reasoning_gym(self) -> "ReasoningGymDataset":
        from drpt_ray.data.reasoning_gym import check_dataset  # imports reasoning_gym only for this task

        check_dataset(self.name, self.config)  # ValueError listing the valid names / keys
        return self


class ReasoningGymSpec(Spec):
    """data.task 'reasoning_gym': target, general and eval pools from reasoning-gym's generators.

    Target and eval use `target` and are scored by the strict verifier (the demanded answer format);
    the general pool uses `general` (None: the target's datasets) and `general_verifier`.
    """

    target: list[ReasoningGymDataset] = Field(
        default_factory=lambda: [ReasoningGymDataset(name="chain_sum", config={"min_terms": 2, "max_terms": 2,
                                                                               "min_digits": 1, "max_digits": 2})],
        min_length=1, max_length=16, description="Datasets of the scarce target pool and the held-out eval pool.",
    )
    general: list[ReasoningGymDataset] | None = Field(
        None, min_length=1, max_length=16,
        description="Datasets of the general pool; None: the target's (the 'format' setting), else e.g. other "
        "tasks ('task mix').",
    )
    general_verifier: Literal["strict", "lenient"] = Field(
        "lenient", description="How general rollouts are scored: strict (the demanded format) or lenient (the right "
        "answer anywhere in the reply). Target and eval are always strict.",
    )
    general_format_frac: float = Field(
        0.5, ge=0, le=1, description="Fraction of lenient general examples whose SFT response (read by SFT and warm "
        "starts only) is in the demanded format; the rest answer in a plain sentence, as data of mixed "
        "provenance does.",
    )
    answer_format: Literal["answer_tag", "last_line"] = Field(
        "answer_tag",
        description="The format the strict verifier demands: <answer>...</answer>, or the reply's last line."
    )
    instruction: str | None = Field(
        None, max_length=1000, description="Text after each question; None: the answer format's own wording."
    )


class DataSpec(Spec):
    task: str | None = Field(
        "scarce_target",
        description="Built-in task, one of drpt_ray.tasks.TASKS (scarce_target: synthetic letter maps, SFT and RL; "
        "arithmetic: synthetic, RL with math answers; gsm8k: real GSM8K problems, after `drpt-ray data fetch gsm8k`; "
        "reasoning_gym: procedural tasks of the reasoning-gym package, see data.reasoning_gym); None means "
        "the paths below.",
    )
    general_path: str | None = Field(None, description="jsonl/parquet of general examples (prompt, response).")
    target_path: str | None = Field(None, description="jsonl/parquet of the scarce target pool.")
    eval_path: str | None = Field(None, description="jsonl/parquet of held-out target examples.")
    prompt_key: str = Field("prompt", description="Column holding the prompt.")
    response_key: str = Field("response", description="Column holding the response.")
    n_target: PoolSize = Field(16, description="Built-in task: size of the target pool.")
    n_general: PoolSize = Field(
        4000, description="Built-in task: size of the general pool (gsm8k: at most this many variants)."
    )
    n_eval: PoolSize = Field(
        256, description="Built-in task: held-out target examples (gsm8k: n_target + n_eval <= 100)."
    )
    p_clean: float = Field(0.3, ge=0, le=1, description="scarce_target: fraction of fully correct general examples.")
    reasoning_gym: ReasoningGymSpec | None = Field(
        None,
        description="data.task 'reasoning_gym': datasets, verifiers and answer format; None: "
        "ReasoningGymSpec's defaults."
    )
    chat_template: bool | None = Field(
        None,
        description="Render prompts as a user turn with the model's chat template; None: the task's default (on for "
        "gsm8k and reasoning_gym, off for the synthetic tasks and files, on for files that hold conversations: "
        "`messages`, or a list of messages as the prompt).",
    )
    max_len: Int = Field(64, ge=4, description="Max tokens of prompt + response.")
    seed: Seed = Field(0, description="Data seed (task generation and shuffling).")

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str | None) -> str | None:
        if v is not None:
            from drpt_ray.tasks import get_task

            get_task(v)  # ValueError listing the valid names
        return v

    @model_validator(mode="after")
    def _paths_when_no_task(self) -> "DataSpec":
        if self.task is None and not (self.general_path and self.target_path):
            raise ValueError("data.task is null, so data.general_path and data.target_path are required")
        if self.reasoning_gym is not None and self.task != "reasoning_gym":
            raise ValueError(f"data.reasoning_gym configures data.task 'reasoning_gym', but data.task is {self.task!r}")
        return self

    @property
    def uses_chat_template(self) -> bool:
        """`chat_template`, with None resolved by the task: real-problem tasks are chat prompts,
        synthetic ones are not."""
        if self.chat_template is not None:
            return self.chat_template
        from drpt_ray.tasks import get_task

        return self.task is not None and get_task(self.task).chat


# --------------------------------------------------------------------------------------------
# Optimisation

class OptimSpec(Spec):
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    # strict=False for the pair only: YAML and JSON have no tuples, so a list must do (its floats stay strict)
    betas: tuple[float, float] = Field((0.9, 0.999), strict=False, description="AdamW betas.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the curated gradient to this norm; None: off.")
    warmup_frac: float = Field(0.03, ge=0, lt=1, description="Linear warmup as a fraction of steps.")
    schedule: Literal["linear", "cosine", "constant"] = Field("linear", description="LR decay after warmup.")


# --------------------------------------------------------------------------------------------
# RL: rollout and algorithm


class SamplingSpec(Spec):
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_new_tokens: Int = Field(16, ge=1, description="Maximum generated tokens per response.")
    n: Int = Field(4, ge=1, description="Responses per prompt (the GRPO group size).")
    seed: Seed | None = Field(None, description="Sampling seed; None draws a fresh one.")


class RolloutSpec(Spec):
    num_workers: WorkerCount = Field(1, description="RolloutWorker actors, each owning one vLLM engine.")
    num_cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs reserved per worker.")
    num_gpus_per_worker: float = Field(0.0, ge=0, description="Ray GPUs reserved per worker (0 on CPU vLLM).")
    kv_cache_gib: Int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE per worker on CPU (GiB).")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="vLLM GPU memory fraction (GPU only).")
    max_model_len: Int = Field(256, ge=8, description="vLLM max sequence length.")
    max_restarts: Int = Field(2, ge=0, description="Ray restarts of a dead worker before the job fails.")
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="Sampling of training rollouts.")
    max_staleness: Int = Field(
        0, ge=0,
        description="Asynchronous RL: rollouts for up to this many coming steps are generated while the learner "
        "updates, and no sample is trained more than this many weight versions after the weights that sampled it "
        "(older ones are dropped and counted in rollout/dropped); algorithm.rollout_correction corrects the "
        "difference. 0: the synchronous loop.",
    )
    partial_rollouts: bool = Field(
        False, description="Asynchronous RL: new weights reach a generation in progress at its next chunk boundary and "
        "its sequences continue under them (each token records its version); false: weights change between "
        "generate calls only.",
    )
    partial_chunk_tokens: Int = Field(
        32, ge=1, description="Partial rollouts: tokens generated between checks for new weights.",
    )
    lora_adapter_sync: bool = Field(
        False, description="model.lora: send the rollout workers only the adapter, which vLLM serves as a LoRARequest, "
        "instead of the full weights with the adapter merged in (model.lora.r must be a rank vLLM serves)."
    )


# The names algorithms/stability.py's rollout correction understands (it checks them again at run time).
CorrectionLevel = Literal["token", "sequence", "geometric"]
CorrectionMode = Literal["truncate", "mask"]


class RolloutCorrectionSpec(Spec):
    """Importance weights of the learner over the rollout engine, bounded (algorithms/stability.py)."""

    level: CorrectionLevel = Field(
        "token", description="token: each token's ratio; sequence: the response's (product of its tokens'); "
        "geometric: the geometric mean of its tokens' ratios (length-independent).",
    )
    mode: CorrectionMode = Field(
        "truncate", description="truncate: weight min(ratio, upper) (TIS); mask: weight the ratio inside "
        "[lower, upper], 0 outside (IcePop when two-sided, TRL's sequence mask).",
    )
    upper: float | None = Field(2.0, gt=0, description="Truncation cap or upper mask bound (None: no cap; "
                                "truncate only).")
    lower: float | None = Field(None, ge=0, description="mode mask: lower bound (None: one-sided).")

    @model_validator(mode="after")
    def _bounds(self) -> "RolloutCorrectionSpec":
        if self.mode == "mask" and self.upper is None:
            raise ValueError("algorithm.rollout_correction.upper: mode 'mask' needs an upper bound")
        if self.lower is not None and (self.mode != "mask" or self.lower >= self.upper):
            raise ValueError("algorithm.rollout_correction.lower: a lower bound needs mode 'mask' and lower < upper")
        return self


class AlgorithmSpec(Spec):
    """How rollouts become a policy loss (RL modes); names resolve in drpt_ray.algorithms registries."""

    advantage: str = Field(
        "grpo", description="Advantage estimator: grpo | grpo_no_std | rloo | reinforce_pp | gae (PPO).",
    )
    policy_loss: str = Field("ppo_clip", description="Policy loss: ppo_clip | reinforce.")
    loss_agg: str = Field(
        "token_mean",
        description="How token losses are averaged (also the regularizer's normaliser units): token_mean | "
        "seq_mean_token_mean | seq_mean_token_sum | seq_mean_token_sum_norm, Dr. GRPO's constant normaliser (token sum "
        "/ (responses x rollout.sampling.max_new_tokens)).",
    )
    clip_eps: float = Field(0.2, gt=0, description="PPO ratio clip.")
    clip_eps_high: float | None = Field(None, gt=0, description="Upper clip (DAPO clip-higher); None: clip_eps.")
    ppo_epochs: Int = Field(1, ge=1, description="Optimizer passes over each rollout batch.")
    kl_coef: float = Field(0.0, ge=0, description="KL-to-reference coefficient (0: no reference policy).")
    kl_estimator: str = Field("k3", description="KL estimator: k1 | k2 | k3.")
    kl_in_reward: bool = Field(False, description="Put the KL penalty in the reward instead of the loss.")
    gamma: float = Field(1.0, gt=0, le=1, description="Discount (REINFORCE++, GAE).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    vf_coef: float = Field(0.1, ge=0, description="Value-loss weight (PPO critic).")
    critic_lr: float = Field(1e-3, gt=0, description="Critic (value head) learning rate.")
    entropy_coef: float = Field(
        0.0, ge=0,
        description="Entropy bonus: the loss subtracts entropy_coef x the policy's token entropy (aggregated "
        "like loss_agg).",
    )
    filter_zero_variance_groups: bool = Field(
        False,
        description="DAPO dynamic sampling: drop groups whose rewards are all equal and sample more prompts to "
        "refill the batch."
    )
    max_sampling_rounds: Int = Field(
        3, ge=1, description="Dynamic sampling: generation rounds per step at most (the batch may stay short).",
    )
    rollout_correction: RolloutCorrectionSpec | None = Field(
        None,
        description="Correct the rollout engine's mismatch (and, asynchronous, the samples' older weights) with "
        "importance weights pi_learner / pi_vllm; None: off. `{}` is token-level truncation at 2 (TIS).",
    )

    @model_validator(mode="before")
    @classmethod
    def _former_tis_cap(cls, data):
        if isinstance(data, dict) and "tis_cap" in data:  # renamed in Dec 2026: say to what, not just "unknown key"
            cap = data["tis_cap"]
            now = "null" if cap is None else f"{{upper: {cap}}} (token-level truncation, the same weights)"
            raise ValueError(f"algorithm.tis_cap is now algorithm.rollout_correction: {now}")
        return data
    mask_truncated_completions: bool = Field(
        False,
        description="Responses cut at max_new_tokens get no policy gradient (they still count in the "
        "group's advantages).",
    )
    target_objective: str = Field(
        "token_pg",
        description="Target loss for g_T: token policy gradient with the target rollouts' own (group-relative) "
        "advantages (default), the paper's reward-weighted log-prob with batch-standardised rewards, or the training "
        "loss itself (docs/target-objectives.md says why token_pg is the default).",
    )

    @field_validator("advantage", "policy_loss", "kl_estimator", "target_objective")
    @classmethod
    def _registered(cls, v: str, info: ValidationInfo) -> str:
        import drpt_ray.algorithms as A

        registry = {"advantage": A.ADVANTAGE_ESTIMATORS,
                    "policy_loss": A.POLICY_LOSSES, "kl_estimator": A.KL_ESTIMATORS,
                    "target_objective": A.TARGET_OBJECTIVES}[info.field_name]
        registry.check(v)  # lists the valid names; imports nothing (see Registry.check)
        return v

    @field_validator("loss_agg")
    @classmethod
    def _known_agg(cls, v: str) -> str:
        from drpt_ray.algorithms import AGG_MODES

        if v not in AGG_MODES:
            raise ValueError(f"unknown loss aggregation {v!r}; valid: {list(AGG_MODES)}")
        return v


def _function_path(v: str) -> str:
    if ":" not in v:
        raise ValueError(f"must look like 'package.module:function', got {v!r}")
    return v


# A user function's import path; only its shape is checked here (the schema never imports user code).
FunctionPath = Annotated[str, AfterValidator(_function_path)]


class RewardFunctionSpec(Spec):
    """One of several user reward functions (`reward.functions`): the reward is their weighted sum."""

    function: FunctionPath = Field(description="Import path `package.module:function`, called as `reward.function` is.")
    weight: float = Field(1.0, description="Its score's factor in the sum (negative: a penalty; 0: logged only).")
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]+$", max_length=64,
        description="Its metrics: reward/<name>/mean (general split) and target/<name>/mean; None: the function's "
        "name (the part after ':').",
    )

    @property
    def label(self) -> str:
        """`name`, else the function's own name."""
        return self.name or self.function.rpartition(":")[2]


class RewardSpec(Spec):
    kind: Literal["task", "exact_match", "math", "function", "model"] = Field(
        "task",
        description="task: the built-in task's verifiers; exact_match / math (math-verify) against the reference "
        "answer; function: a user `module:function` (or several, `functions`); model: a reward model (RLHF).",
    )
    function: FunctionPath | None = Field(None, description="kind=function: import path `package.module:function`.")
    functions: list[RewardFunctionSpec] | None = Field(
        None, min_length=1,
        description="kind=function, instead of `function`: several functions ({function, weight, name}); the reward "
        "is their weighted sum, each one's mean a metric of its own (TRL's reward_funcs and reward_weights).",
    )
    model_path: str | None = Field(
        None, description="kind=model: sequence-classification model dir; None builds a tiny one in code.",
    )
    timeout_s: float = Field(5.0, gt=0, description="Per-call timeout of a user reward function (reward 0 on timeout).")
    target_kind: Literal["task", "exact_match", "math"] | None = Field(
        None,
        description="Score the target split (target rollouts, held-out evaluation) with this verifier instead of "
        "`kind`: e.g. an RLHF job whose reward model can be gamed while the scarce target data has a checkable "
        "wanted behaviour.",
    )
    max_error_frac: float = Field(
        0.5, ge=0, le=1,
        description="End the job (FAILED, with the first error's traceback) at a step where more than this share "
        "of the responses of a split could not be scored (raised, timed out, returned a non-number); fewer score 0 "
        "and count in reward/errors. 1: never end; 0: end at the first error.",
    )

    @model_validator(mode="after")
    def _functions_given(self) -> "RewardSpec":
        if self.kind == "function" and not (self.function or self.functions):
            raise ValueError("reward.kind is 'function', so reward.function ('module:function') or "
                             "reward.functions is required")
        if self.function and self.functions:
            raise ValueError("give reward.function (one function) or reward.functions (several), not both")
        labels = [f.label for f in self.functions or []]
        twice = sorted({x for x in labels if labels.count(x) > 1})
        if twice:
            raise ValueError(f"reward.functions: more than one function is named {twice}; give each a distinct "
                             "`name` (its metrics are reward/<name>/mean)")
        return self

    def user_functions(self) -> dict[tuple[str | int, ...], RewardFunctionSpec]:
        """The user functions this section names, by their location in a job spec: `functions`, or
        `function` as the one function of weight 1."""
        if self.functions:
            return {("reward", "functions", i, "function"): f for i, f in enumerate(self.functions)}
        return {("reward", "function"): RewardFunctionSpec(function=self.function)} if self.function else {}


class CheckpointSpec(Spec):
    every: Int = Field(
        0, ge=0, description="Steps between checkpoints, and one at the last step (0: none, only the final model).",
    )
    keep: Int = Field(2, ge=1, description="Checkpoints kept on disk (oldest deleted).")
    resume: str = Field(
        "auto", min_length=1,
        description="auto: continue from the newest checkpoint in output_dir, or start fresh if there is none; "
        "never: start fresh; or a path: a checkpoint directory (<output_dir>/checkpoints/step_N, with trainer.json) "
        "or a run's output_dir (its newest checkpoint), loaded and continued here, writing into this run's own "
        "output_dir (a path that holds no checkpoint is an error). true / false, the values before these, still "
        "mean auto / never. Through the REST API a path must lie under the operator's read roots "
        "(DRPT_READ_ROOTS), outside the runs directory.",
    )
    resume_changed_spec: bool = Field(
        False,
        description="Resume even when a key that changes what is trained (algorithm, optim, data, regularizer, "
        "...: any but the run's length, evaluation, checkpoint, divergence, logging, name and output_dir keys) "
        "differs from the checkpoint's spec; the changes are printed. false: such a resume is refused, listing them.",
    )

    @field_validator("resume", mode="before")
    @classmethod
    def _resume_bool(cls, v):
        # `resume` was a bool: YAML files, deploy manifests and scripts still say true / false.
        return {True: "auto", False: "never"}[v] if isinstance(v, bool) else v


class DivergenceSpec(Spec):
    """When an RL run counts as collapsed: an `alert` event, and with `stop_on_divergence` the end of the job."""

    zero_variance_steps: Int = Field(
        10, ge=0,
        description="Alert after this many consecutive steps in which every general reward of the batch is "
        "equal (0: never)."
    )
    entropy_floor: float | None = Field(
        None, ge=0, description="Alert when policy/entropy falls below this (None: never).",
    )
    entropy_ceiling_frac: float | None = Field(
        0.8, gt=0, le=1, description="Alert when policy/entropy rises above this fraction of ln(vocabulary size), a "
        "uniform policy's entropy: the policy is dissolving (None: never)."
    )
    stop_on_divergence: bool = Field(
        False, description="End the job with status DIVERGED at the first alert (its last good checkpoint kept).",
    )


class ResourcesSpec(Spec):
    learner_num_workers: WorkerCount = Field(
        1, description="Data-parallel learner workers (Ray Train); 1 = a single learner.",
    )
    learner_num_cpus: float = Field(1.0, gt=0, description="Ray CPUs reserved per learner worker.")
    learner_num_gpus: float = Field(0.0, ge=0, description="Ray GPUs reserved per learner worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Placement of the learner workers' bundles."
    )
    fsdp: bool = Field(
        False, description="Shard the policy with torch FSDP (fully_shard) across learner workers (GPU).",
    )


# The fields that may name user code as 'package.module:function' (imported where the job runs).
CODE_FIELDS: tuple[tuple[str, ...], ...] = (("algorithm", "advantage"), ("algorithm", "policy_loss"),
                                            ("algorithm", "kl_estimator"),
                                            ("algorithm", "target_objective"), ("reward", "function"))
# The fields that name a file or directory a job reads (a server admits only paths under its read roots).
PATH_FIELDS: tuple[tuple[str, ...], ...] = (("model", "path"), ("data", "general_path"), ("data", "target_path"),
                                            ("data", "eval_path"), ("reward", "model_path"), ("checkpoint", "resume"))
RESUME_MODES = ("auto", "never")  # checkpoint.resume's words; any other value of it is a path


def names_path(loc: tuple[str, ...], value) -> bool:
    """Whether `value`, of the PATH_FIELDS field at `loc`, names a file or directory (None does not,
    nor do checkpoint.resume's words)."""
    return isinstance(value, str) and not (loc == ("checkpoint", "resume") and value in RESUME_MODES)


class SamplesSpec(Spec):
    """The rollouts a user reads (TRL's log_completions): to samples.jsonl, TensorBoard text and the stream."""

    every: Int = Field(10, ge=0, description="RL: every this many steps, a table of general and target rollouts "
                       "(prompt, response, reward, advantage), and at every evaluation its greedy answers (0: none).")
    groups: Int = Field(2, ge=1, le=64, description="Prompts per split in each table, with all their n responses "
                        "(a group's advantages are read against each other).")


class JobSpec(Spec):
    """One post-training job: SFT, RLHF or RLVR with a Dr. regularizer. The REST API, the CLI, the
    library and Ray Tune all read this model."""

    mode: Literal["sft", "rlhf", "rlvr"] = Field(
        "sft", description="sft | rlhf (reward model) | rlvr (verifiable rewards).",
    )
    name: str | None = Field(None, max_length=NAME_MAX_LEN, description="Free-form job name.")
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    regularizer: RegularizerSpec = Field(default_factory=RegularizerSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    algorithm: AlgorithmSpec = Field(default_factory=AlgorithmSpec)
    reward: RewardSpec = Field(default_factory=RewardSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    divergence: DivergenceSpec = Field(default_factory=DivergenceSpec)
    steps: Int = Field(2000, ge=1, description="Optimizer steps (RL: rollout batches).")
    batch_size: Int = Field(
        8, ge=1, description="SFT: general examples per step; RL: prompts per step (x rollout.sampling.n responses).",
    )
    target_batch_size: Int = Field(
        1, ge=1, description="SFT: target examples per capture; RL: target prompts per capture.",
    )
    warm_start_sft_steps: Int = Field(0, ge=0, description="RL: SFT steps on warm_start_pool before RL starts.")
    warm_start_lr: float = Field(3e-3, gt=0, description="RL: constant AdamW LR of the warm-start SFT steps.")
    warm_start_batch_size: Int = Field(16, ge=1, description="RL: examples per warm-start SFT step.")
    warm_start_pool: Literal["general", "target"] = Field(
        "general",
        description="RL: the pool the warm-start SFT steps train on (target: teach the scarce target's format)."
    )
    eval_before_warm_start: bool = Field(
        False,
        description="RL: also evaluate the model as loaded, before the warm start (logged at step 0 as eval_base/...)."
    )
    eval_every: Int = Field(100, ge=1, description="Steps between held-out target evaluations.")
    eval_size: Int = Field(64, ge=1, description="RL: held-out target prompts per evaluation.")
    eval_generate: Int = Field(
        0, ge=0, description="SFT: held-out prompts the model answers greedily at each evaluation; "
        "eval/target_exact is the share answered exactly as the data (stripped), and the first answers go to the "
        "log. 0: the loss only.",
    )
    eval_samples: Int = Field(
        8, ge=0, description="RL: sampled responses per held-out prompt for pass@k (0: greedy only).",
    )
    eval_k: Int = Field(4, ge=1, description="RL: k of the reported pass@k (<= eval_samples; unbiased estimator).")
    seed: Seed = Field(0, description="Training seed.")
    output_dir: str = Field(
        "runs/job", description="Where metrics.jsonl, checkpoints, the model and plots go. Through the REST API: a "
        "relative path inside the job's own run directory (DRPT_RUNS_DIR/<job id>); an absolute path or '..' "
        "is refused (422).",
    )
    progress: bool = Field(True, description="Show a progress bar.")
    tensorboard: bool = Field(True, description="Also write TensorBoard event files.")
    samples: SamplesSpec = Field(default_factory=SamplesSpec)

    @field_validator("output_dir")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("output_dir must not be empty")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "JobSpec":
        # torch: loaded only when a spec is checked
        from drpt_ray.algorithms import ADVANTAGE_ESTIMATORS, TARGET_OBJECTIVES

        if self.mode == "rlhf" and self.reward.kind != "model":
            raise ValueError("mode 'rlhf' scores with a reward model: set reward.kind to 'model'")
        if self.mode == "rlvr" and self.reward.kind == "model":
            raise ValueError("mode 'rlvr' uses verifiable rewards: reward.kind 'model' belongs to mode 'rlhf'")
        if self.mode == "sft" and FEASIBLE_SETS.get(self.regularizer.feasible_set).filters_buffer:
            raise ValueError(f"regularizer.feasible_set {self.regularizer.feasible_set!r} filters an RL rollout "
                             "buffer; SFT has none: use layerwise_subset, global_subset or soft_subset")
        alg = self.algorithm
        if ":" not in alg.advantage + alg.target_objective:  # user code's metadata is read where it runs (preflight)
            self.check_algorithm(ADVANTAGE_ESTIMATORS.meta(alg.advantage), TARGET_OBJECTIVES.meta(alg.target_objective))
        if self.rollout.partial_rollouts and not self.rollout.max_staleness:
            raise ValueError("rollout.partial_rollouts needs rollout.max_staleness > 0: weights change during a "
                             "generation only in the asynchronous loop")
        if self.mode != "sft" and self.rollout.max_staleness:
            if self.algorithm.rollout_correction is None:
                raise ValueError("rollout.max_staleness > 0 trains on samples of older weights: set "
                                 "algorithm.rollout_correction (importance weights that correct them; {} is "
                                 "token-level truncation at 2)")
        if self.rollout.lora_adapter_sync:
            if self.model.lora is None:
                raise ValueError("rollout.lora_adapter_sync sends a LoRA adapter: set model.lora, or turn it off")
            if self.model.lora.r not in VLLM_LORA_RANKS:
                raise ValueError(f"rollout.lora_adapter_sync: vLLM serves LoRA ranks {list(VLLM_LORA_RANKS)}, "
                                 f"model.lora.r is {self.model.lora.r}")
        if self.mode != "sft" and self.eval_samples and self.eval_k > self.eval_samples:
            raise ValueError(f"eval_k ({self.eval_k}) must be <= eval_samples ({self.eval_samples})")
        self._check_learner_layout()
        return self

    def check_algorithm(self, advantage, objective) -> None:
        """What the advantage estimator's and the target objective's metadata rule out (the registries'
        `AdvantageMeta` and `TargetObjectiveMeta`; for user code read where the job runs).

        Raises:
            ValueError: a group-normalising estimator with rollout.sampling.n < 2, or a target
                objective that does not read the advantages with rollout.max_staleness > 0.
        """
        if self.mode == "sft":
            return
        if advantage.needs_groups and self.rollout.sampling.n < 2:
            raise ValueError(f"algorithm.advantage {self.algorithm.advantage!r} normalises within groups: "
                             "rollout.sampling.n must be >= 2")
        if self.rollout.max_staleness and not objective.weighs_advantages:
            raise ValueError(f"algorithm.target_objective {self.algorithm.target_objective!r} does not read the "
                             "advantages, so the importance weights of stale target rollouts cannot reach it: use "
                             "'token_pg' or 'train_loss' with rollout.max_staleness > 0")

    def user_code(self) -> dict[tuple[str | int, ...], str]:
        """The `module:function` paths this job would import and run, by field location."""
        values = {loc: get_path(self.model_dump(), ".".join(loc)) for loc in CODE_FIELDS}
        return ({loc: v for loc, v in values.items() if isinstance(v, str) and ":" in v}
                | {loc: f.function for loc, f in self.reward.user_functions().items()})

    def _check_learner_layout(self) -> None:
        """What the data-parallel / FSDP learner cannot run (drpt_ray/learner/fsdp.py says why)."""
        res, reg = self.resources, self.regularizer
        if res.learner_num_workers > 1 and reg.target_mode == "merged":
            raise ValueError("regularizer.target_mode: 'merged' needs one learner worker (target rows share each "
                             "rank's backward); use 'separate' with resources.learner_num_workers > 1")
        if not res.fsdp:
            return
        if res.learner_num_workers < 2:
            raise ValueError("resources.fsdp shards the policy over learner workers: set "
                             "resources.learner_num_workers >= 2")
        if self.model.lora is not None:
            raise ValueError("resources.fsdp is not supported with model.lora (a LoRA model's trained weights fit one "
                             "device; use data parallelism with fsdp: false)")
        if reg.target_mode == "merged":
            raise ValueError("regularizer.target_mode 'merged' is not supported with resources.fsdp; use 'separate'")
        if FEASIBLE_SETS.get(reg.feasible_set).granularity(reg) is Granularity.GLOBAL and reg.passes != "two_pass":
            raise ValueError(f"regularizer.passes: global selection ({reg.feasible_set}) with resources.fsdp needs "
                             "passes: two_pass (one-pass writes gradients after the backward, when FSDP "
                             "has reduced them)")


# --------------------------------------------------------------------------------------------
# Sweeps (Ray Tune)


class SearchDim(Spec):
    """One searched JobSpec field: a list of values (grid / choice) or a numeric range."""

    values: list[float | int | str | bool] | None = Field(
        None, max_length=MAX_SEARCH_VALUES, description="Grid points (grid) or choices (random, asha)."
    )
    low: float | None = Field(None, description="Range start (random, asha).")
    high: float | None = Field(None, description="Range end (random, asha).")
    log: bool = Field(False, description="Sample the range log-uniformly.")

    @model_validator(mode="after")
    def _one_kind(self) -> "SearchDim":
        if (self.values is None) == (self.low is None or self.high is None):
            raise ValueError("give either values, or both low and high")
        if self.values is not None and not self.values:
            raise ValueError("values must not be empty")
        if self.low is not None and self.high is not None and not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.log and self.low is not None and self.low <= 0:
            raise ValueError("log ranges need low > 0")
        return self

    def probes(self, current) -> list:
        """The values a trial can take, as far as checking them goes: every value, or a range's two
        ends; for an int field (`current`, the base's value, is an int) the integer ends Tune draws
        between (inclusive)."""
        if self.values is not None:
            return list(self.values)
        if isinstance(current, int) and not isinstance(current, bool):
            low, high = math.ceil(self.low), math.floor(self.high)
            if low > high:
                raise ValueError(f"the range [{self.low}, {self.high}] of an integer field holds no integer")
            return [low, high]
        return [self.low, self.high]


class SweepSpec(Spec):
    """A Ray Tune sweep: trials are real training runs of `base` with `space` applied."""

    name: str | None = Field(None, max_length=NAME_MAX_LEN, description="Free-form sweep name.")
    base: JobSpec = Field(default_factory=JobSpec, description="The job every trial starts from.")
    space: dict[str, SearchDim] = Field(
        ...,
        description="Dotted JobSpec field paths (e.g. regularizer.tau, optim.lr, algorithm.kl_coef) -> "
        "search dimension."
    )
    metric: str = Field("eval/target_reward", description="Metric the best trial maximises or minimises.")
    mode: Literal["max", "min"] = Field("max", description="Whether larger `metric` is better.")
    scheduler: Literal["grid", "random", "asha"] = Field(
        "grid", description="grid: every combination; random / asha: num_samples draws (ASHA stops bad trials early).",
    )
    num_samples: Int = Field(1, ge=1, description="Draws for random / asha (grid: repeats of the grid).")
    max_concurrent_trials: Int = Field(
        1, ge=1, description="Trials running at once (each reserves its actors' resources).",
    )
    output_dir: str = Field(
        "runs/sweep", description="Trial output dirs (<output_dir>/<trial id>) go under here. Through the REST API: a "
        "relative path inside the sweep's own run directory; an absolute path or '..' is refused (422).",
    )

    @model_validator(mode="after")
    def _space_paths_exist(self) -> "SweepSpec":
        if not self.space:
            raise ValueError("space must name at least one field")
        if self.scheduler == "grid" and any(d.values is None for d in self.space.values()):
            raise ValueError("scheduler 'grid' needs values for every space entry")
        if self.trial_count() > MAX_SWEEP_TRIALS:  # before the (per-value, ~1 ms each) checks below
            raise ValueError(f"space: the sweep would run {self.trial_count()} trials; a sweep runs at most "
                             f"{MAX_SWEEP_TRIALS}")
        base = self.base.model_dump()
        for path, dim in self.space.items():
            if path in TRIAL_OWNED:
                raise ValueError(f"space: {path!r} is set for each trial by the sweep itself and cannot be searched")
            try:
                probes = dim.probes(get_path(base, path))
            except (KeyError, TypeError):
                raise ValueError(f"space: {path!r} is not a JobSpec field") from None
            except ValueError as e:
                raise ValueError(f"space: {path}: {e}") from None
            for value in probes:  # every value, so no trial fails later on a value refused here
                _check_trial_value(base, path, value)
        return self

    def trial_count(self) -> int:
        """How many trials the sweep runs, computed without enumerating them: grid: the product of the
        value counts x num_samples (Tune repeats the grid); random / asha: num_samples."""
        if self.scheduler != "grid":
            return self.num_samples
        return math.prod(len(d.values) for d in self.space.values()) * self.num_samples

    def user_code(self) -> dict[tuple[str | int, ...], str]:
        """The `module:function` paths any trial would import and run, by field location (base and space)."""
        out = {("base", *loc): path for loc, path in self.base.user_code().items()}
        for path, dim in self.space.items():
            if tuple(path.split(".")) in CODE_FIELDS:
                out |= {("space", path, "values", i): v
                        for i, v in enumerate(dim.values or []) if isinstance(v, str) and ":" in v}
        return out


TRIAL_OWNED = ("output_dir", "progress")  # drpt_ray.tune.trial_spec sets these for every trial


def _check_trial_value(base: dict, path: str, value) -> None:
    """ValueError naming `path` and `value` unless `base` with that value is a valid JobSpec."""
    try:
        JobSpec.model_validate(set_path(base, path, value))
    except ValidationError as e:
        raise ValueError(f"space: {path}={value!r} is not a valid value: {e.errors()[0]['msg']}") from None


def get_path(tree: dict, path: str):
    """The value at the dotted `path` of the nested dict `tree` (KeyError or TypeError if absent)."""
    for part in path.split("."):
        tree = tree[part]
    return tree


def set_path(tree: dict, path: str, value) -> dict:
    """A copy of the nested dict `tree` with the dotted `path` set to `value` (KeyError if absent)."""
    head, _, rest = path.partition(".")
    if head not in tree:
        raise KeyError(path)
    out = dict(tree)
    if rest:
        if not isinstance(tree[head], dict):
            raise KeyError(path)
        out[head] = set_path(tree[head], rest, value)
    else:
        out[head] = value
    return out


# --------------------------------------------------------------------------------------------
# Loading


def format_validation_error(err: ValidationError, source: str = "config", model: type[BaseModel] | None = None) -> str:
    """One line per problem, naming the dotted field path, the rule and the bad value; with the
    `model` that was validated, an unknown key also gets the closest known one."""
    lines = [f"{source}: {len(err.errors())} invalid field(s)"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        got = e.get("input")
        got_s = f" (got {got!r})" if not isinstance(got, dict) else ""
        hint = did_you_mean(model, e["loc"]) if model is not None and e["type"] == "extra_forbidden" else None
        lines.append(f"  {path}: {e['msg']}{got_s}" + (f"; did you mean {hint!r}?" if hint else ""))
    return "\n".join(lines)


def nested_spec(annotation) -> type[BaseModel] | None:
    """The spec class a field holds (`X`, `X | None`), or None for a plain value."""
    return next((t for t in (annotation, *typing.get_args(annotation))
                 if isinstance(t, type) and issubclass(t, BaseModel)), None)


def did_you_mean(model: type[BaseModel], loc: tuple) -> str | None:
    """The known key closest to the unknown last part of `loc`, among the fields of the model found by
    following `loc` through `model`'s nested specs; None when nothing is close."""
    import difflib

    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        sub = field and nested_spec(field.annotation)
        if sub is None:
            return None
        model = sub
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    return close[0] if close else None


class _SpecLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a repeated key (PyYAML keeps the last one silently) and reads
    `1e-3` as a float, as YAML 1.2 does (PyYAML's 1.1 rules want a dot, so it would be the string
    "1e-3", which the strict schema refuses)."""

    def construct_mapping(self, node, deep=False):
        seen = []  # a list: keys may be unhashable, which the base class reports itself
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key_node.tag != "tag:yaml.org,2002:merge" and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r}", key_node.start_mark)
            seen.append(key)
        return super().construct_mapping(node, deep)


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+.0123456789"))


def set_dotted(raw: dict, item: str) -> None:
    """Apply one "a.b.c=value" override to a spec's raw mapping (the value read as YAML: 1e-3, true,
    [1, 2], {k: v}); the sections on the way are created or must be mappings."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. regularizer.feasible_set=full")
    try:
        value = yaml.load(text, Loader=_SpecLoader)
    except yaml.YAMLError as e:
        raise ValueError(f"--set {key}: the value is not valid YAML: {e}") from None
    *sections, last = key.strip().split(".")
    node = raw
    for i, part in enumerate(sections):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {key}: {'.'.join(sections[: i + 1])} is not a section")
    node[last] = value


def load_spec(path: str | Path, model: type[Spec], overrides: list[str] = ()) -> Spec:
    """Parse a YAML file into `model`, with `overrides` ("dotted.key=value", the value read as YAML)
    applied on top; raise ValueError with field paths on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        raw = yaml.load(path.read_text(), Loader=_SpecLoader) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at top level, got {type(raw).__name__}")
    for item in overrides:
        set_dotted(raw, item)
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ValueError(format_validation_error(e, str(path), model)) from None
