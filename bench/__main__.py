"""`python -m bench NAME [--quick] [--out DIR]`: run a benchmark, write NAME.json and NAME.md."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from bench.harness import RESULTS, save

BENCHMARKS = {
    "loop": "raymb's train_step (1 worker, k=1, data in memory) vs a hand-written torch loop",
    "models": "tokens/s of the gpt, images/s of the cnn: train_step vs a hand-written loop",
    "ingest": "cached source and Ray Data rows/s; the trainer's data-wait share, shuffle cost",
    "epochs": "20 epochs: raymb train vs a hand-written DDP script; per-epoch overhead",
    "scaling": "samples/s of the mlp on 1, 2 and 4 workers; per-step all-reduce time",
    "startup": "`raymb train` to its first step vs a minimal TorchTrainer script",
    "microbatch": "the same global batch with k = 1, 4, 16 microbatches: samples/s, memory",
    "strategies": "train.sync grad vs param (H=1,4,16) vs diloco (H=16,64): loss, bytes, time",
    "rng": "row-keyed draws: ms per million; dropout and data.augment against none in a step",
    "advice": "train.noise_scale's cost on the mlp and gpt; lr-find's wall time against train",
    "tune": "a `raymb tune` grid of 4 vs the same 4 `raymb train` runs one by one; trial overhead",
}
# startup, tune and epochs start Ray in subprocesses, so they run first, before `all` holds a
# session.
ORDER = (
    "loop",
    "models",
    "rng",
    "advice",
    "startup",
    "tune",
    "epochs",
    "ingest",
    "scaling",
    "microbatch",
    "strategies",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="raymb benchmarks. Each runs its baseline and raymb in one invocation, "
        "alternating repetitions, and writes DIR/NAME.json and DIR/NAME.md.",
        epilog="benchmarks:\n"
        + "\n".join(f"  {name:<11} {text}" for name, text in BENCHMARKS.items())
        + "\n  all         every benchmark, one after another",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=[*BENCHMARKS, "all"], help="the benchmark to run")
    parser.add_argument(
        "--quick", action="store_true", help="a tiny size: checks that it runs, not how fast"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        metavar="DIR",
        help="where NAME.json and NAME.md go (default: bench/results)",
    )
    args = parser.parse_args(argv)
    names = ORDER if args.name == "all" else (args.name,)
    for name in names:
        print(f"bench: {name}{' (quick)' if args.quick else ''} ...", flush=True)
        started = time.perf_counter()
        result = importlib.import_module(f"bench.{name}").run(quick=args.quick)
        result["duration_s"] = round(time.perf_counter() - started, 1)
        save(name, result, args.out, quick=args.quick)
        print(f"bench: {name} took {result['duration_s']:.0f} s; wrote {args.out / name}.md")
        print((args.out / f"{name}.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
