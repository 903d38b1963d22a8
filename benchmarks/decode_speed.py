"""Greedy decoding under interventions: KV-cached vs re-running the intervened prefill.

    python benchmarks/decode_speed.py                                   # embedlens-mini, 32 tokens
    python benchmarks/decode_speed.py --model DIR --new-tokens 64 --repeats 5 --batch 4 --device cuda

For each condition, `embedlens.compress.generate.generate` runs the same prompts with
``use_cache=True`` (one intervened prefill, then one cached step per token) and
``use_cache=False`` (the reference: the intervened prefill re-run on prompt + tokens so far
for every token), interleaved, `--repeats` times after one warm-up; prints the median
seconds of each, the speed-up (re-prefill / cached) and whether both produced the same
tokens. No eos: every row generates exactly `--new-tokens` tokens, so both do the same work.

The model: `--model` (default ``resources/models/embedlens-mini``, which ``make run``
builds); when that directory is missing, a tiny random LLaVA (`embedlens.testing.tiny`)
is built in a temporary directory and used instead (the output says which). Token groups:
seeded random labels (speed does not depend on which tokens they are, only on how many).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CONDITIONS = [
    {"name": "baseline", "op": "baseline"},
    {"name": "prune_dead", "op": "prune", "groups": ["dead"]},
    {"name": "skip_attn_visual", "op": "skip", "groups": ["visual"], "sublayers": "attn"},
    {"name": "inject_mid", "op": "inject", "layer": "mid"},
    {"name": "exit_mid", "op": "exit", "layer": "mid"},
    {"name": "knockout_t2v", "op": "knockout", "edges": "text->visual"},
    {"name": "prune_dead_inject_mid", "op": "prune_inject", "groups": ["dead"], "layer": "mid"},
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resources/models/embedlens-mini")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2, help="prompts per generate call (different images)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--conditions", default=",".join(c["name"] for c in CONDITIONS),
                    help="comma-separated names among: " + ", ".join(c["name"] for c in CONDITIONS))
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of each mode per condition")
    args = ap.parse_args()

    from embedlens import vqa
    from embedlens.compress import interventions as iv
    from embedlens.compress.conditions import parse_conditions
    from embedlens.compress.generate import generate
    from embedlens.datasets.synthetic import make_examples
    from embedlens.runtime import resolve_device

    dev = resolve_device(args.device)
    model_dir = Path(args.model)
    tmp = None
    if not (model_dir / "config.json").exists():
        from embedlens.testing.tiny import build_tiny_model

        tmp = tempfile.TemporaryDirectory()
        print(f"{model_dir} not found (make run builds it): using a tiny random LLaVA instead")
        model_dir = build_tiny_model("llava", Path(tmp.name) / "llava", seed=0)
    model, processor, adapter = iv.load_model(model_dir, device=dev, dtype=args.dtype)
    N = adapter.num_layers
    examples = make_examples(args.batch, 0)
    seqs = []
    for k, ex in enumerate(examples):
        inputs = vqa.prepare_prompt(processor, ex.image, "Describe the image.", prompt_fn=adapter.format_prompt)
        seqs.append(iv.capture_sequence(model, {key: v.to(dev) for key, v in inputs.items()}, f"img{k}"))
    rng = np.random.default_rng(0)
    labels = [list(rng.choice(iv.LABELS, s.n_visual, p=[0.05, 0.05, 0.4, 0.5])) for s in seqs]
    chosen = args.conditions.split(",")
    unknown = set(chosen) - {c["name"] for c in CONDITIONS}
    if unknown:
        ap.error(f"unknown conditions {sorted(unknown)}")
    conds = [dict(c, layer=N // 2) if c.get("layer") == "mid" else c for c in CONDITIONS if c["name"] in chosen]
    variants = parse_conditions(conds, N)
    sync = torch.cuda.synchronize if str(dev).startswith("cuda") else (lambda: None)

    def run(v, use_cache: bool):
        plans = [iv.plan_for(s, lab, v.intervention, N) for s, lab in zip(seqs, labels)]
        sync()
        t = time.perf_counter()
        g = generate(model, seqs, plans, max_new_tokens=args.new_tokens, eos_token_ids=[], use_cache=use_cache)
        sync()
        return time.perf_counter() - t, g

    print(f"model {model_dir}  device {dev}  dtype {args.dtype}  decoder layers {N}  batch {args.batch}  "
          f"prompt tokens {[len(s) for s in seqs]} (visual {seqs[0].n_visual})  new tokens {args.new_tokens}  "
          f"repeats {args.repeats} (+{args.warmup} warm-up)  torch threads {torch.get_num_threads()}  "
          f"cores {os.cpu_count()}  load {os.getloadavg()[0]:.1f}")
    print(f"{'condition':<24}{'cached s':>10}{'re-prefill s':>14}{'speed-up':>10}  "
          f"{'cached prefill/decode s':>24}  same tokens")
    ratios = []
    for v in variants:
        for _ in range(args.warmup):
            run(v, True), run(v, False)
        tc, tr = [], []
        for _ in range(args.repeats):
            t, gc = run(v, True)
            tc.append(t)
            t, gr = run(v, False)
            tr.append(t)
        mc, mr = statistics.median(tc), statistics.median(tr)
        ratios.append(mr / mc)
        print(f"{v.name:<24}{mc:>10.3f}{mr:>14.3f}{mr / mc:>9.1f}x  "
              f"{gc.prefill_seconds:>11.3f} / {gc.decode_seconds:<10.3f}  {gc.tokens == gr.tokens}")
    print(f"median speed-up over conditions: {statistics.median(ratios):.1f}x")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
