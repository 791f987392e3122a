"""Room for RL on the toy world: pass@1 against pass@k of a checkpoint, printed as JSON.

GRPO's group-normalised advantage is zero when all samples of a prompt score the same, so RL can
only raise accuracy where the model is sometimes right: pass@k well above pass@1 at the rollout
temperature. This samples k completions per problem and scores them with the GRPO reward.

    python benchmarks/toy_headroom.py CHECKPOINT TOY_SPLIT_DIR [--n 100] [--k 8] [--temperature 1.0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="model folder (e.g. WORKDIR/sft/final)")
    ap.add_argument("data", help="toy split folder (e.g. WORKDIR/toy/rl)")
    ap.add_argument("--n", type=int, default=100, help="problems")
    ap.add_argument("--k", type=int, default=8, help="samples per problem")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from visionr1_jobs.config import Sampling
    from visionr1_jobs.data.load import load_dataset_dir
    from visionr1_jobs.generation.transformers_backend import TransformersBackend
    from visionr1_jobs.training.rewards import score

    samples = load_dataset_dir(Path(args.data))[: args.n]
    backend = TransformersBackend(args.checkpoint, batch_size=args.k * 16)
    requests = [
        {"messages": [{"role": "user", "content": s.question}], "images": list(s.images)}
        for s in samples
        for _ in range(args.k)
    ]
    t0 = time.time()
    gens = backend.generate(
        requests,
        Sampling(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed),
    )
    rewards, fmt, tokens = [], [], []
    for i, g in enumerate(gens):
        s = samples[i // args.k]
        sc = score(g.text, s.answer, s.choices)
        rewards.append(sc.format * sc.accuracy)
        fmt.append(sc.format)
        tokens.append(g.completion_tokens)
    groups = [rewards[i : i + args.k] for i in range(0, len(rewards), args.k)]
    mixed = sum(0 < sum(g) < len(g) for g in groups)
    print(
        json.dumps(
            {
                "checkpoint": args.checkpoint,
                "n": len(samples),
                "k": args.k,
                "temperature": args.temperature,
                "pass@1": round(sum(rewards) / len(rewards), 4),
                f"pass@{args.k}": round(sum(any(g) for g in groups) / len(groups), 4),
                "groups_with_signal": round(mixed / len(groups), 4),
                "format_rate": round(sum(fmt) / len(fmt), 4),
                "mean_tokens": round(sum(tokens) / len(tokens), 1),
                "seconds": round(time.time() - t0, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
