"""Turn examples into causal-LM batches whose loss covers the response tokens only."""

from __future__ import annotations

from typing import Any

import torch

from drpt_ray.data.examples import Example

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index


def tokenize_sft(tokenizer: Any, examples: list[Example], max_len: int) -> dict[str, torch.Tensor]:
    """Tokenize (prompt, response) pairs into a right-padded batch with response-only labels.

    Prompt and response are tokenized separately and their ids concatenated, so the boundary
    between them is exact even where a BPE would merge across it. The prompt gets the
    tokenizer's own special tokens (e.g. a BOS for Llama-style tokenizers); the response gets
    none, and the eos token id is appended to it and supervised so the model learns to stop.
    A row longer than `max_len` loses prompt tokens from the left (the end of the prompt, next
    to the response, matters most; a leading BOS is dropped like any other token).

    Args:
        tokenizer: A Hugging Face tokenizer with an `eos_token_id`. Padding uses
            `pad_token_id`, or `eos_token_id` when the tokenizer has no pad token (the value is
            irrelevant: padding is masked out of attention and labels).
        examples: The rows, at least one.
        max_len: Maximum tokens per row, prompt + response + eos.

    Returns:
        `input_ids`, `attention_mask` and `labels`, each a LongTensor [n, L] with L the longest
        row (L <= max_len). `labels` equals `input_ids` on response and eos tokens and is
        IGNORE_INDEX (-100) on prompt and padding tokens; `attention_mask` is 0 on padding.

    Raises:
        ValueError: `examples` is empty, the tokenizer has no eos token, or a response plus
            eos leaves no room for at least one prompt token (without one, the first response
            token would have no position to be predicted from).
    """
    if not examples:
        raise ValueError("tokenize_sft needs at least one example")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; one is needed to end responses")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=True)["input_ids"]
    responses = tokenizer([e.response for e in examples], add_special_tokens=False)["input_ids"]
    rows: list[tuple[list[int], list[int]]] = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        r = list(r) + [eos]
        budget = max_len - len(r)
        if budget < 1:
            raise ValueError(
                f"example {i}: response is {len(r)} tokens with eos, which leaves no room for a prompt "
                f"token within max_len={max_len}"
            )
        rows.append((list(p)[-budget:], r))

    width = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        input_ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, len(p) : n] = torch.tensor(r, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def supervised_token_counts(labels: torch.Tensor) -> torch.Tensor:
    """Number of positions per row that the causal-LM loss averages over.

    The loss predicts token t+1 from position t, i.e. it compares logits[:, :-1] with
    labels[:, 1:], so a label at position 0 is never a target and is not counted.

    Args:
        labels: [n, L] labels with IGNORE_INDEX (-100) on unsupervised positions.

    Returns:
        LongTensor [n]: `(labels[:, 1:] != -100).sum(1)`.
    """
    return (labels[:, 1:] != IGNORE_INDEX).sum(1)
