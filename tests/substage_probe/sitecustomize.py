"""A probe inside the processes the GRPO stage starts for its PTST sub-stages (test only).

Python imports ``sitecustomize`` at start-up from the path, so a test that puts this folder
first on PYTHONPATH and sets ``VISIONR1_PROBE_DIR`` reaches into every child process without a
hook in the stage code. In each process that builds a GRPOTrainer it writes
``trainer-<pid>.json``: the digests of the policy and KL-reference weights the trainer holds
when it starts, the trainer's seed, its rollout sizes and attention kernels, and the ids of the prompts each generation batch consumed.
It also replaces the reward with one that moves the random tiny model (the real reward is
always 0 for it, so no advantage and no weight change).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any


def weights_digest(model: Any) -> str:
    """One SHA-256 over every tensor's name, dtype, shape and bytes (the test hashes the
    weights on disk the same way)."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


if os.environ.get("VISIONR1_PROBE_DIR"):
    import json
    from pathlib import Path

    import trl

    from visionr1_jobs.training import rewards

    _OUT = Path(os.environ["VISIONR1_PROBE_DIR"]) / f"trainer-{os.getpid()}.json"

    class ProbedGRPOTrainer(trl.GRPOTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._probe: dict[str, Any] = {
                "pid": os.getpid(),
                "seed": self.args.seed,
                "shuffle_dataset": self.args.shuffle_dataset,
                "policy": weights_digest(self.model),
                "reference": weights_digest(self.ref_model),
                "batches": [],
                "steps_per_generation": self.args.steps_per_generation,
                "num_iterations": self.args.num_iterations,
                "generation_batch_size": self.args.generation_batch_size,
                "attn": [
                    self.model.config._attn_implementation,
                    self.ref_model.config._attn_implementation if self.ref_model else None,
                ],
            }
            self._dump()

        def _dump(self) -> None:
            tmp = _OUT.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._probe))
            tmp.replace(_OUT)

        def _generate_and_score_completions(self, inputs: Any) -> Any:
            self._probe["batches"].append([x["id"] for x in inputs])
            self._dump()
            return super()._generate_and_score_completions(inputs)

    def by_length(kind: str, timeout_s: float = 5.0) -> tuple[list[Any], list[float]]:
        def reward(completions: list[Any], **_: Any) -> list[float]:
            return [float(len(str(c))) for c in completions]

        return [reward], [1.0]

    trl.GRPOTrainer = ProbedGRPOTrainer  # type: ignore[misc]
    rewards.reward_functions = by_length
