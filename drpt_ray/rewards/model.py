"""Reward models (reward.kind 'model', RLHF): a sequence classifier's scalar logit as the reward.

`RewardModelScorer` is a plain class (usable in-process); `RewardModelWorker` is the same class
as a Ray actor, and `ModelReward` is the `Reward` that calls one such actor. The text scored is
the prompt concatenated with the response, with no chat template. `tiny_reward_model` builds a
small random classifier in code, so RLHF runs offline; its scores are meaningless but
deterministic, which is what tests and demos need.
"""

from __future__ import annotations

import json
from pathlib import Path

import ray
import torch
from ray.actor import ActorHandle

from drpt_ray.rewards.verifiable import Reward, RewardResult, Split, check_batch

# transformers (and drpt_ray.models, which imports it) are imported inside the functions that use
# them: every function-reward child process imports this package, and transformers would more
# than double its start-up time.

_MARKER = "drpt_tiny_reward_model.json"


def tiny_reward_model(out_dir: Path | str, seed: int = 0) -> Path:
    """Build a small random `LlamaForSequenceClassification` (one label) and save it with its tokenizer.

    Sizes: hidden 64, 2 layers, 2 heads of dim 32, 1 key/value head, MLP 128; the tokenizer is
    `drpt_ray.models.build_tokenizer()`. A directory already built with the same seed is reused.
    Files are written to a sibling temporary directory and moved in, marker last, so a concurrent
    reader never loads a half-written model.

    Args:
        out_dir: Directory to write; created if needed.
        seed: Seed of the random weights (the caller's RNG state is left untouched).

    Returns:
        `out_dir` as a `Path`; loads with `AutoModelForSequenceClassification.from_pretrained`.
    """
    out_dir = Path(out_dir)
    marker = {"seed": seed}
    try:
        if json.loads((out_dir / _MARKER).read_text()) == marker:
            return out_dir
    except (OSError, ValueError):
        pass  # absent or unreadable marker: (re)build
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from drpt_ray.models import MAX_POSITIONS, build_tokenizer, save_model_dir

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=MAX_POSITIONS,
        num_labels=1,
        # The classifier reads the logit at the last non-pad token, found through pad_token_id.
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(config)
    return save_model_dir(out_dir, _MARKER, marker, model, tokenizer)


class RewardModelScorer:
    """Scores texts with a one-label sequence-classification model on CPU."""

    def __init__(self, model_path: str, batch_size: int = 16, max_length: int = 512) -> None:
        """Args:
        model_path: Local directory of a model with one label and its tokenizer.
        batch_size: Texts per forward pass.
        max_length: Tokens kept per text; longer texts lose their start (the response is at the end).
        """
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.batch_size = batch_size
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.truncation_side = "left"
        self.model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=torch.float32).eval()
        # Batches need padding, and the classifier finds each text's last token through pad_token_id.
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """The model's logit for each `prompt + response`.

        Args:
            prompts: Prompt texts.
            responses: Response texts, one per prompt.

        Returns:
            One float per pair, in input order.
        """
        texts = [p + r for p, r in zip(prompts, responses, strict=True)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            scores += self.model(**batch).logits[:, 0].tolist()
        return scores


RewardModelWorker = ray.remote(RewardModelScorer)


class ModelReward(Reward):
    """The reward of a `RewardModelWorker` actor: its logit for each prompt + response."""

    def __init__(self, worker: ActorHandle) -> None:
        """Args: worker: A `RewardModelWorker` handle; `close` kills it."""
        self.worker = worker

    def __call__(
        self, prompts: list[str], responses: list[str], references: list[str | None], split: Split,
        extras: list[dict] | None = None,
    ) -> RewardResult:
        """Score the batch on the actor (references, split and extras unused); see `Reward.__call__`."""
        check_batch(prompts, responses, references, split, extras)
        scores = ray.get(self.worker.score.remote(prompts=prompts, responses=responses))
        return RewardResult(scores=scores, errors=0)

    def close(self) -> None:
        """Kill the actor."""
        ray.kill(self.worker)
