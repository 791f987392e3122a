"""``visionr1 toy data`` and ``visionr1 toy model``: the laptop world, no hub needed."""

from __future__ import annotations

import argparse
import json
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="toy_command", metavar="WHAT")
    sub.required = True
    data = sub.add_parser(
        "data", help="write toy visual-math problems: DIR/train, DIR/rl, DIR/bench (parquet)"
    )
    data.add_argument("--out", required=True, help="folder to write train/, rl/ and bench/ into")
    data.add_argument("--n", type=int, default=64, help="training problems (rows; default 64)")
    data.add_argument("--seed", type=int, default=0, help="seed; same seed = same data")
    data.add_argument("--n-rl", type=int, default=None, help="RL problems (default: --n)")
    data.add_argument(
        "--n-bench", type=int, default=None, help="benchmark problems (default: max(n/2, 12))"
    )
    data.add_argument("--rows-per-shard", type=int, default=256, help="rows per parquet file")
    model = sub.add_parser("model", help="create the tiny random Qwen2.5-VL and its processor")
    model.add_argument("--out", required=True, help="model folder (save_pretrained layout)")
    model.add_argument("--seed", type=int, default=0, help="weights and tokenizer seed")
    model.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    model.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    model.add_argument("--vision-depth", type=int, default=1, help="vision blocks (default 1)")


def main(args: argparse.Namespace) -> int:
    start = time.time()
    if args.toy_command == "data":
        from visionr1_jobs.toy.dataset import write_toy_dataset

        for name in ("n", "n_rl", "n_bench", "rows_per_shard"):
            value = getattr(args, name)
            if value is not None and value < 1:
                print(
                    f"error: --{name.replace('_', '-')} must be >= 1, got {value}", file=sys.stderr
                )
                return 2
        rows = write_toy_dataset(
            args.out,
            args.n,
            args.seed,
            n_rl=args.n_rl,
            n_bench=args.n_bench,
            rows_per_shard=args.rows_per_shard,
        )
        print(json.dumps({"out": args.out, "rows": rows, "seconds": round(time.time() - start, 2)}))
        return 0
    from visionr1_jobs.toy.model import create_tiny_model

    path = create_tiny_model(
        args.out,
        seed=args.seed,
        hidden=args.hidden,
        layers=args.layers,
        vision_depth=args.vision_depth,
    )
    print(json.dumps({"out": str(path), "seconds": round(time.time() - start, 2)}))
    return 0
