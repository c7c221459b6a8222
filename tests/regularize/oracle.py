"""Independent references for the regularizer tests: one backward per example, plain autograd.

Nothing here imports the regularizer: scores, selections and curated gradients are computed from
brute-force per-example gradients and the formulas of method.md 1.2-1.3 directly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from drpt_ray.data import supervised_token_counts
from drpt_ray.lm_losses import select_rows, sequence_loss_sums

VOCAB = 48


def tiny_llama(seed: int = 0, arch: str = "llama") -> nn.Module:
    """A 2-layer float64 Llama (or Qwen2, which has q/k/v biases) with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    cfg = cfg_cls(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False, attn_implementation="eager",
        pad_token_id=0,
    )
    model = model_cls(cfg).to(torch.float64)
    # Random init has near-zero logits; scale the head so per-example gradients differ visibly.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


class TinyMLP(nn.Module):
    """Per-token model with an embedding, biased Linears and a LayerNorm: exact in float64."""

    def __init__(self, seed: int = 0, vocab: int = VOCAB, width: int = 16):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.fc1 = nn.Linear(width, 2 * width)
        self.norm = nn.LayerNorm(2 * width)
        self.fc2 = nn.Linear(2 * width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.double()

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.embed(input_ids)
        # A causal running mean mixes tokens of one example (never across examples).
        h = torch.cumsum(h, dim=1) / torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None]
        h = self.fc2(torch.tanh(self.norm(self.fc1(h))))
        return _Out(self.head(h))


class _Out:
    def __init__(self, logits):
        self.logits = logits


def make_batch(n: int, seed: int, min_len: int = 5, max_len: int = 11,
               prompt_len: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded rows of varying length; the first 2-3 tokens of each row are an unsupervised prompt."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (n,), generator=g)
    L = int(lens.max())
    ids = torch.zeros(n, L, dtype=torch.long)
    mask = torch.zeros(n, L, dtype=torch.long)
    labels = torch.full((n, L), -100, dtype=torch.long)
    for i, ln in enumerate(lens.tolist()):
        row = torch.randint(1, VOCAB, (ln,), generator=g)
        prompt = prompt_len or int(torch.randint(2, 4, (1,), generator=g))
        ids[i, :ln], mask[i, :ln] = row, 1
        labels[i, prompt:ln] = row[prompt:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def per_example_grads(model, batch, normaliser: float) -> list[dict[str, torch.Tensor]]:
    """G_i: the gradient of example i's token-sum loss / normaliser, one backward each."""
    n = batch["input_ids"].shape[0]
    out = []
    for i in range(n):
        sums, _ = sequence_loss_sums(model, select_rows(batch, torch.tensor([i])))
        out.append(grads(model, sums.sum() / normaliser))
    return out


def target_grad(model, target_batch) -> dict[str, torch.Tensor]:
    sums, counts = sequence_loss_sums(model, target_batch)
    return grads(model, sums.sum() / counts.sum())


def block_params(name: str, model: nn.Module) -> list[str]:
    m = dict(model.named_modules())[name]
    return [f"{name}.{p}" for p, _ in m.named_parameters(recurse=False)]


def dot(a: dict, b: dict, keys: list[str]) -> float:
    return float(sum((a[k] * b[k]).sum() for k in keys if k in a and k in b))


def layer_scores(G: list[dict], gT: dict, keys: list[str]) -> torch.Tensor:
    return torch.tensor([dot(g, gT, keys) for g in G], dtype=torch.float64)


def topk_set(s: torch.Tensor, frac: float) -> list[int]:
    k = max(1, math.floor(frac * len(s) + 1e-9))
    order = sorted(range(len(s)), key=lambda i: (-float(s[i]), i))
    return sorted(order[:k])


def filter_set(s: torch.Tensor, frac: float) -> list[int]:
    neg = sorted([i for i in range(len(s)) if s[i] < 0], key=lambda i: float(s[i]))
    drop = set(neg[: math.floor(frac * len(neg) + 1e-9)])
    return [i for i in range(len(s)) if i not in drop]


def curated(G: list[dict], S: list[int], units: torch.Tensor, normaliser: float, keys: list[str]) -> dict:
    """(N / T_S) * sum_{i in S} G_i for the given parameter names (zero when S is empty)."""
    t_s = float(units[S].sum()) if S else 0.0
    scale = normaliser / t_s if t_s > 0 else 0.0
    return {k: scale * sum((G[i][k] for i in S), torch.zeros_like(G[0][k])) for k in keys}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def units_of(batch) -> torch.Tensor:
    return supervised_token_counts(batch["labels"]).to(torch.float64)


def select(batch: dict, lo: int, n: int = 3) -> dict:
    """Rows lo .. lo+n of a batch."""
    return {k: v[lo : lo + n] for k, v in batch.items()}
