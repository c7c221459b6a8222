"""The one schema: pydantic models shared by the REST API, the CLI, the library and Ray Tune.

Every default lives here, once. Unknown keys are rejected (`extra="forbid"`) so a typo in a YAML
file or a request body is an error that names the dotted field path, never a silently ignored
setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class Spec(BaseModel):
    """Base for every config model: unknown fields fail, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------
# Model


class LoraSpec(Spec):
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names (suffixes) that get adapters, or 'all-linear'."
    )


class TinyModelSpec(Spec):
    """A small random model built in code (no download), for tests, demos and benchmarks."""

    arch: Literal["llama", "qwen2"] = Field("llama", description="Architecture family.")
    hidden_size: int = Field(64, ge=16, description="Hidden width; head_dim must stay a multiple of 16 for vLLM CPU.")
    intermediate_size: int = Field(128, ge=16, description="MLP width.")
    num_layers: int = Field(2, ge=1, description="Decoder layers.")
    num_heads: int = Field(2, ge=1, description="Attention heads.")
    num_kv_heads: int = Field(1, ge=1, description="Key/value heads (GQA).")
    seed: int = Field(0, description="Seed of the random weights.")

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


# --------------------------------------------------------------------------------------------
# Regularizer (method.md sections 1-3)

FEASIBLE_SETS = ("full", "target_only", "global_subset", "layerwise_subset", "soft_subset", "iif")


class SketchSpec(Spec):
    kind: Literal["gaussian", "rademacher"] = Field("gaussian", description="Entries of the random factors.")
    dim: int = Field(64, ge=1, description="Sketch size k per factor (k*k per layer); identity when k >= dim.")
    seed: int = Field(0, description="Base seed; each layer and factor derives its own.")


class RegularizerSpec(Spec):
    """Which feasible set the general batch builds and how the target gradient is scored against it."""

    feasible_set: Literal[FEASIBLE_SETS] = Field(  # type: ignore[valid-type]
        "layerwise_subset",
        description="full | target_only | global_subset | layerwise_subset | soft_subset | iif (RL buffer filtering).",
    )
    selection: Literal["topk", "filter"] = Field(
        "topk", description="Subset rule: top-k by score, or keep non-negative scores (filtering)."
    )
    frac: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="topk: fraction kept (k = max(1, floor(frac*n))); filter: fraction of negatives dropped, most negative first.",
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
    direct_chunk: int = Field(4, ge=1, description="Examples per chunk when materialising per-example gradients.")
    target_mode: Literal["separate", "merged"] = Field(
        "separate", description="Target gradient from its own backward (cached) or from rows of the same batch."
    )
    refresh_every: int = Field(1, ge=1, description="Steps between target-gradient recaptures.")
    hook_embeddings: bool = Field(False, description="Also curate nn.Embedding weights (gather-dot scores).")
    exclude: list[str] = Field(
        default_factory=list, description="Module-name substrings that are never hooked (they get ordinary gradients)."
    )


# --------------------------------------------------------------------------------------------
# Data


class DataSpec(Spec):
    task: Literal["scarce_target"] | None = Field(
        "scarce_target", description="Built-in synthetic task; None means the paths below."
    )
    general_path: str | None = Field(None, description="jsonl/parquet of general examples (prompt, response).")
    target_path: str | None = Field(None, description="jsonl/parquet of the scarce target pool.")
    eval_path: str | None = Field(None, description="jsonl/parquet of held-out target examples.")
    prompt_key: str = Field("prompt", description="Column holding the prompt.")
    response_key: str = Field("response", description="Column holding the response.")
    n_target: int = Field(16, ge=1, description="Synthetic task: size of the target pool.")
    n_general: int = Field(4000, ge=1, description="Synthetic task: size of the general pool.")
    n_eval: int = Field(256, ge=1, description="Synthetic task: held-out target examples.")
    p_clean: float = Field(0.3, ge=0, le=1, description="Synthetic task: fraction of fully correct general examples.")
    max_len: int = Field(64, ge=4, description="Max tokens of prompt + response.")
    seed: int = Field(0, description="Data seed (task generation and shuffling).")

    @model_validator(mode="after")
    def _paths_when_no_task(self) -> "DataSpec":
        if self.task is None and not (self.general_path and self.target_path):
            raise ValueError("data.task is null, so data.general_path and data.target_path are required")
        return self


# --------------------------------------------------------------------------------------------
# SFT


class OptimSpec(Spec):
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the curated gradient to this norm; None: off.")
    warmup_frac: float = Field(0.03, ge=0, lt=1, description="Linear warmup as a fraction of steps.")
    schedule: Literal["linear", "cosine", "constant"] = Field("linear", description="LR decay after warmup.")


class SFTSpec(Spec):
    """An SFT run with a Dr. regularizer (`drpt-ray sft CONFIG.yaml`)."""

    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    regularizer: RegularizerSpec = Field(default_factory=RegularizerSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    steps: int = Field(2000, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="General examples per step.")
    target_batch_size: int = Field(1, ge=1, description="Target examples per step (drawn cycling the pool).")
    eval_every: int = Field(100, ge=1, description="Steps between held-out target-loss evaluations.")
    seed: int = Field(0, description="Training seed.")
    output_dir: str = Field("runs/sft", description="Where metrics.jsonl, the model and plots go.")
    progress: bool = Field(True, description="Show a progress bar.")

    @field_validator("output_dir")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("output_dir must not be empty")
        return v


# --------------------------------------------------------------------------------------------
# RL: rollout and algorithm


class SamplingSpec(Spec):
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(16, ge=1, description="Maximum generated tokens per response.")
    n: int = Field(4, ge=1, description="Responses per prompt (the GRPO group size).")
    seed: int | None = Field(None, description="Sampling seed; None draws a fresh one.")


class RolloutSpec(Spec):
    num_workers: int = Field(1, ge=1, description="RolloutWorker actors, each owning one vLLM engine.")
    num_cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs reserved per worker.")
    num_gpus_per_worker: float = Field(0.0, ge=0, description="Ray GPUs reserved per worker (0 on CPU vLLM).")
    kv_cache_gib: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE per worker on CPU (GiB).")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="vLLM GPU memory fraction (GPU only).")
    max_model_len: int = Field(256, ge=8, description="vLLM max sequence length.")
    max_restarts: int = Field(2, ge=0, description="Ray restarts of a dead worker before the job fails.")
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="Sampling of training rollouts.")


# --------------------------------------------------------------------------------------------
# Loading


def format_validation_error(err: ValidationError, source: str = "config") -> str:
    """One line per problem, naming the dotted field path, the rule and the bad value."""
    lines = [f"{source}: {len(err.errors())} invalid field(s)"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        got = e.get("input")
        got_s = f" (got {got!r})" if not isinstance(got, dict) else ""
        lines.append(f"  {path}: {e['msg']}{got_s}")
    return "\n".join(lines)


def load_spec(path: str | Path, model: type[Spec]) -> Spec:
    """Parse a YAML file into `model`; raise ValueError with field paths on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at top level, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ValueError(format_validation_error(e, str(path))) from None
