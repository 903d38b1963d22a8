"""Projector-training step time with and without bf16 autocast, side by side in one run.

    python benchmarks/bench_train.py [--model resources/models/embedlens-mini] [--steps 6]

Uses the real recipe (embedlens.mini.train: frozen towers, precomputed features, prefix
cache, batch 16) on synthetic training images; each variant runs `--steps` timed steps
after one warm-up step, `--repeats` times interleaved, from the same initial projector.
Prints the median seconds per step and the ratio float32 / bf16 (> 1: bf16 is faster),
which is why the recipe trains with bf16 autocast on this CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resources/models/embedlens-mini")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    from embedlens.datasets.synthetic import make_examples
    from embedlens.mini import train as mt
    from embedlens.mini.build import init_projector_
    from embedlens.runtime import resolve_device

    dev = resolve_device(args.device)
    model, processor = mt.load_model(args.model)
    model.to(dev)
    examples = make_examples(4 * args.batch_size, mt.TRAIN_DATA_SEED_BASE)
    features = mt.precompute_features(model, processor, [e.image for e in examples], progress=False)
    prompt_ids, targets = mt.tokenize_examples(processor, [e.caption for e in examples])
    tok = processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)

    def run(bf16: bool) -> float:
        init_projector_(model.model.multi_modal_projector, 0)
        recipe = mt.Recipe(steps=args.steps + 1, batch_size=args.batch_size, bf16_autocast=bf16)
        trainer = mt.ProjectorTrainer(model, prompt_ids, targets, features, recipe, pad)
        trainer.step()  # warm-up
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            trainer.step()
        sync()
        return (time.perf_counter() - start) / args.steps

    times: dict[str, list[float]] = {"bf16 autocast": [], "float32": []}
    for _ in range(args.repeats):
        times["bf16 autocast"].append(run(True))
        times["float32"].append(run(False))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {args.model}  device {dev}  batch {args.batch_size}  steps {args.steps} x "
          f"{args.repeats} repeats  torch threads {torch.get_num_threads()}")
    for k, v in med.items():
        print(f"  {k:<14} {v:6.2f} s/step   (400 steps: {400 * v / 60:5.1f} min)")
    print(f"  ratio float32 / bf16 = {med['float32'] / med['bf16 autocast']:.2f}")


if __name__ == "__main__":
    main()
