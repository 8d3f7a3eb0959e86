"""Unlearning throughput and peak memory: teacher cache vs live teachers, same model and data.

    python bench/unlearn_teacher_cache.py [--hidden 512] [--layers 4] [--vocab 2048]
                                          [--authors 100] [--epochs 2] [--threads 2]
                                          [--json results.json]

Builds a small Llama (random weights; a perturbed copy plays the strengthened model: speed and
memory do not depend on what the weights know), then runs ``rkld.train.unlearn`` once per mode,
each in a fresh subprocess so that the memory figures do not mix:
- tokens/s: input tokens per second of the training steps after the first (which pays
  one-off initialisation), from the run's log.jsonl;
- wall s: the whole ``unlearn`` call, model loading and (cache mode) building the cache included;
- peak MiB: the process's resident-set high-water mark during the ``unlearn`` call, above its
  size just before it (Linux: the mark is reset through /proc/self/clear_refs).
Prints a table and, with --json, writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r'''
import json, sys, time, torch
from pathlib import Path
settings, threads = json.loads(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
from rkld.config import UnlearnConfig
from rkld.train import unlearn

def rss_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])

Path("/proc/self/clear_refs").write_text("5")      # reset the high-water mark
before = rss_kib("VmRSS")
started = time.perf_counter()
out, stats = unlearn(UnlearnConfig(**settings))
wall = time.perf_counter() - started
steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][1:]
print(json.dumps({"tokens_per_s": sum(s["input_tokens"] for s in steps)
                                  / sum(s["seconds"] for s in steps),
                  "train_seconds": stats["train_seconds"], "wall_seconds": wall,
                  "peak_extra_mib": (rss_kib("VmHWM") - before) / 1024}))
'''


def build_models(root: Path, hidden: int, layers: int, vocab: int, authors: int) -> None:
    import torch

    from rkld.data import load_benchmark
    from rkld.models import build_tiny_model
    bench = load_benchmark("synthetic", max_authors=authors)
    texts = [r["question"] + " " + r["answer"] for r in bench.split("full")]
    config = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=max(1, hidden // 64), intermediate_size=hidden * 8 // 3)
    build_tiny_model(texts, root / "original", seed=0, **config)
    strengthened, tokenizer = build_tiny_model(texts, seed=0, **config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in strengthened.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    strengthened.save_pretrained(root / "strengthened")
    tokenizer.save_pretrained(root / "strengthened")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--authors", type=int, default=100, help="synthetic authors; forget10 "
                        "holds a tenth of them, 10 QA each")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_models(root, args.hidden, args.layers, args.vocab, args.authors)
        results = {}
        for mode, live in (("teacher cache", False), ("live teachers", True)):
            settings = dict(model=str(root / "original"), strengthened=str(root / "strengthened"),
                            out=str(root / mode.replace(" ", "_")), max_authors=args.authors,
                            forget="forget10", epochs=args.epochs, batch_size=32,
                            micro_batch_size=8, max_length=64, lr=1e-4, progress=False,
                            live_teachers=live)
            child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings),
                                    str(args.threads)], capture_output=True, text=True, check=True)
            results[mode] = json.loads(child.stdout.strip().splitlines()[-1])
    cache, live = results["teacher cache"], results["live teachers"]
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; forget10 of "
          f"{args.authors} synthetic authors, {args.epochs} epochs, {args.threads} threads")
    print(f"{'mode':<15}{'tokens/s':>10}{'train s':>10}{'wall s':>10}{'peak MiB':>10}")
    for mode, r in results.items():
        print(f"{mode:<15}{r['tokens_per_s']:>10.0f}{r['train_seconds']:>10.2f}"
              f"{r['wall_seconds']:>10.2f}{r['peak_extra_mib']:>10.1f}")
    speedup = cache["tokens_per_s"] / live["tokens_per_s"]
    memory = cache["peak_extra_mib"] / live["peak_extra_mib"]
    print(f"teacher cache: {speedup:.2f}x the tokens/s of live teachers (target >= 1.5x), "
          f"{memory:.2f}x their peak memory (target < 1)")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "results": results, "speedup": speedup,
                                         "memory_ratio": memory}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
