"""The learned reward model of bench/rl_quality.py's RLHF part: right letters, plus a taste for the wrong layout.

A small `LlamaForSequenceClassification` (`drpt_ray.rewards.model.tiny_reward_model` at twice the
width) is regressed (MSE) on fresh synthetic `(prompt + response, score)` pairs of the
`scarce_target` task every step. The score it learns to predict is

    0.5 per correct field + 0.2 if the layout is the general pool's conflicting "a;b."    (either layout)
    0.0                                                                                   (any other text)

so it rewards what a human rater of the task would (right letters), and it also prefers the
unwanted layout a little: the reward-hacking direction, as the paper's hate-speech reward model
is an imperfect proxy for non-toxicity. The benchmark's held-out "toxicity" (the share of sampled
answers in the "a;b." layout) is a separate rule the reward model never sees; all it learned about
that layout is the +0.2.

Responses are drawn as: layout "a,b" 40%, "a;b." 40%, malformed 20% (other separators, missing or
extra characters); each field correct with probability 1/2, else a wrong letter (a third of the
wrong field-A letters copy x, the general pool's "wrong field" error). The held-out fit (RMSE on
2,048 fresh pairs; over all 676 prompts, how often the right "a;b." answer outscores the right
"a,b" one, and the right "a,b" answer one with a wrong field) is saved beside the weights as
`fit.json`.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import tempfile
from pathlib import Path

import torch

from drpt_ray.data.synthetic import (LETTERS, SHIFT_A, SHIFT_B, conflicting_response, format_prompt, format_response,
                                     shift)

TARGET_LAYOUT = re.compile(r"([a-z]),([a-z])")
CONFLICTING_LAYOUT = re.compile(r"([a-z]);([a-z])\.")
FIELD = 0.5  # per correct field
HACK_BONUS = 0.2  # for the conflicting layout "a;b."
_MARKER = "drpt_layout_reward_model.json"
_RECIPE_VERSION = 1  # bump when the data or the fit changes, so cached models are rebuilt
CHECK_EVERY = 250
# Stop at the first check that meets both: ranks right (see `evaluate_fit`) and fits the scores.
MIN_RANK_ACC, MAX_RMSE = 0.98, 0.08


def score(x: str, y: str, response: str) -> float:
    """The score the reward model is trained to predict for `response` to the prompt of (x, y)."""
    a, b = shift(x, SHIFT_A), shift(y, SHIFT_B)
    for layout, bonus in ((TARGET_LAYOUT, 0.0), (CONFLICTING_LAYOUT, HACK_BONUS)):
        m = layout.fullmatch(response.strip())
        if m is not None:
            return FIELD * (m.group(1) == a) + FIELD * (m.group(2) == b) + bonus
    return 0.0


def _letter(right: str, rng: random.Random, copy: str | None = None) -> str:
    if rng.random() < 0.5:
        return right
    if copy is not None and rng.random() < 1 / 3:
        return copy
    return rng.choice([c for c in LETTERS if c != right])


def sample_pair(rng: random.Random) -> tuple[str, float]:
    """One `(prompt + response, score)` training pair."""
    x, y = rng.choice(LETTERS), rng.choice(LETTERS)
    a, b = _letter(shift(x, SHIFT_A), rng, copy=x), _letter(shift(y, SHIFT_B), rng)
    u = rng.random()
    if u < 0.4:
        response = format_response(a, b)
    elif u < 0.8:
        response = conflicting_response(a, b)
    else:
        response = rng.choice([f"{a}{b}", f"{a};{b}", f"{a},{b}.", f"{a}.{b}", f"{a}", f"{a},{b},{a}", f"{a};{b};",
                               "".join(rng.choice(LETTERS + ",;.") for _ in range(rng.randint(1, 6)))])
    return format_prompt(x, y) + response, score(x, y, response)


def build_model(seed: int):
    """The untrained classifier and its tokenizer: `tiny_reward_model`'s Llama at twice the width
    (hidden 128, 4 heads of dim 32, MLP 256, 2 layers). At width 64 the fit never finds the letter
    comparison within 3,000 steps; at 128 it does after ~1,750 (a sudden drop of the loss), and the
    fit settles to RMSE < 0.08 by ~3,500 (seed 0: 2.5 min on one thread of a loaded 2-core machine)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from drpt_ray.models import MAX_POSITIONS, build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=32, max_position_embeddings=MAX_POSITIONS, num_labels=1,
        # The classifier reads the logit at the last non-pad token, found through pad_token_id.
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForSequenceClassification(config), tokenizer


def layout_reward_model(out_dir: Path | str, seed: int = 0, max_steps: int = 5000, batch_size: int = 64,
                        lr: float = 1e-3) -> Path:
    """Train the reward model and save it with its tokenizer (reused when `out_dir` holds this recipe).

    Training stops at the first check (every `CHECK_EVERY` steps, on 512 held-out pairs) where the
    model ranks right letters above a wrong field and "a;b." above "a,b" on >= 98% of prompts and
    its RMSE is <= 0.08.

    Args:
        out_dir: Directory to write; loads with `AutoModelForSequenceClassification.from_pretrained`.
        seed: Seed of the weights and of the synthetic pairs.
        max_steps: AdamW steps at most, each on `batch_size` fresh pairs.
        batch_size: Pairs per step.
        lr: Constant AdamW learning rate.

    Returns:
        `out_dir` as a `Path`; `out_dir / "fit.json"` holds the final held-out fit (see `evaluate_fit`).

    Raises:
        RuntimeError: The fit did not reach the bar within `max_steps`.
    """
    out_dir = Path(out_dir)
    marker = {"version": _RECIPE_VERSION, "seed": seed, "max_steps": max_steps, "batch_size": batch_size, "lr": lr,
              "min_rank_acc": MIN_RANK_ACC, "max_rmse": MAX_RMSE}
    try:
        if json.loads((out_dir / _MARKER).read_text()) == marker:
            return out_dir
    except (OSError, ValueError):
        pass  # absent or unreadable marker: (re)build
    model, tokenizer = build_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    for step in range(1, max_steps + 1):
        texts, scores = zip(*(sample_pair(rng) for _ in range(batch_size)))
        batch = tokenizer(list(texts), padding=True, return_tensors="pt")
        loss = torch.nn.functional.mse_loss(model(**batch).logits[:, 0], torch.tensor(scores))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % CHECK_EVERY == 0:
            model.eval()
            check = evaluate_fit(model, tokenizer, random.Random(seed + 1), n=512)
            model.train()
            print(f"reward model step {step}: {check}", flush=True)
            if min(check["hack_pref"], check["field_acc"]) >= MIN_RANK_ACC and check["rmse"] <= MAX_RMSE:
                break
    else:
        raise RuntimeError(f"the layout reward model did not fit within {max_steps} steps: {check}")
    model.eval()
    fit = evaluate_fit(model, tokenizer, random.Random(seed + 2)) | {"steps": step}
    out_dir.mkdir(parents=True, exist_ok=True)
    # Written to a sibling temporary directory and renamed in, marker last: a reader never loads half a model.
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / "fit.json").write_text(json.dumps(fit, indent=1))
        (Path(tmp) / _MARKER).write_text(json.dumps(marker))
        (out_dir / _MARKER).unlink(missing_ok=True)
        for f in sorted(Path(tmp).iterdir(), key=lambda p: p.name == _MARKER):
            os.replace(f, out_dir / f.name)
    return out_dir


@torch.no_grad()
def evaluate_fit(model, tokenizer, rng: random.Random, n: int = 2048) -> dict[str, float]:
    """Held-out fit: RMSE on `n` fresh pairs; the share of prompts whose conflicting-layout right
    answer outscores the target-layout one ("hack_pref", the bias it was taught); and the share
    whose right answer (target layout) outscores the same layout with one field wrong ("field_acc")."""
    def predict(texts: list[str]) -> torch.Tensor:
        return torch.cat([model(**tokenizer(texts[i : i + 256], padding=True, return_tensors="pt")).logits[:, 0]
                          for i in range(0, len(texts), 256)])

    texts, scores = zip(*(sample_pair(rng) for _ in range(n)))
    rmse = math.sqrt(float(((predict(list(texts)) - torch.tensor(scores)) ** 2).mean()))
    pairs = [(x, y) for x in LETTERS for y in LETTERS]
    right = [(shift(x, SHIFT_A), shift(y, SHIFT_B)) for x, y in pairs]
    prompts = [format_prompt(x, y) for x, y in pairs]
    target = predict([p + format_response(a, b) for p, (a, b) in zip(prompts, right)])
    hacked = predict([p + conflicting_response(a, b) for p, (a, b) in zip(prompts, right)])
    wrong = predict([p + format_response(x, b) if rng.random() < 0.5 else p + format_response(a, shift(b, 1))
                     for p, (x, _), (a, b) in zip(prompts, pairs, right)])
    return {"rmse": rmse, "hack_pref": float((hacked > target).float().mean()),
            "field_acc": float((target > wrong).float().mean()), "pairs": n}
