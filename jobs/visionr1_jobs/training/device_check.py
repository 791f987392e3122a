"""GPU smoke check of both trainers at a realistic width: one SFT step and one GRPO step in
bf16 under DeepSpeed ZeRO, on a randomly initialised Qwen2.5-VL; prints tokens/s and peak GPU
memory as JSON. Run by ``scripts/device-check.sh`` under ``torchrun --nproc_per_node=1`` (DeepSpeed
wants a process group). Uses the stages' own helpers (DeepSpeed config, batches, data rows,
reward) but not MLflow, so the GPU image needs no tracking stack.

Width: Qwen2.5-VL-7B's (hidden 3584, 28 heads, 4 KV heads, MLP 18944, vocab 152064; vision
width 1280) with few layers, so it fits one GPU with its optimizer state.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from visionr1_jobs.training import runtime


def build_model(out: Path, layers: int, vision_depth: int) -> tuple[Path, int]:
    """A random Qwen2.5-VL of 7B width saved with the toy processor (no hub access needed)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from visionr1_jobs.toy.model import SPECIAL_TOKENS, build_processor

    processor = build_processor()
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": layers,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_position_embeddings": 32768,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1_000_000.0,
                "mrope_section": [16, 24, 24],
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": vision_depth,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 3584,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [vision_depth - 1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


def _samples(root: Path, n: int) -> list[Any]:
    from visionr1_jobs.data.load import load_dataset_dir
    from visionr1_jobs.toy.dataset import write_toy_dataset

    write_toy_dataset(root / "toy", n, seed=0, n_rl=n, n_bench=12)
    train = load_dataset_dir(root / "toy" / "train", "toy")
    for s in train:
        s.response = (
            f"<think> Let me look at the image carefully. {s.question} Counting gives {s.answer}. "
            f"</think><answer> Final Answer:{s.answer} </answer>"
        )
    return train


class _Timer:
    """Times each optimizer step and counts the tokens it trained on."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self._t = 0.0

    def callback(self) -> Any:
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                import torch

                torch.cuda.synchronize()
                timer._t = time.time()

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                import torch

                torch.cuda.synchronize()
                timer.steps.append(time.time() - timer._t)

        return _CB()


def sft_step(
    model_dir: Path, work: Path, samples: list[Any], zero: str, steps: int, seq_batch: int
) -> dict[str, Any]:
    import torch
    from trl import SFTConfig, SFTTrainer

    from visionr1_jobs.config import SFTParams
    from visionr1_jobs.training.data import sft_rows, to_dataset

    params = SFTParams(deepspeed=zero, save_steps=10_000, logging_steps=1)
    ds_path = runtime.write_deepspeed_config(zero, True, work)
    args = SFTConfig(
        **runtime.common_training_kwargs(params, work / "sft", True, ds_path),
        learning_rate=5e-6,
        max_steps=steps,
        per_device_train_batch_size=seq_batch,
        gradient_accumulation_steps=1,
        max_length=2048,
        completion_only_loss=True,
    )
    processor = runtime.load_processor(str(model_dir), None, None)
    model = runtime.load_model(str(model_dir), True)
    timer = _Timer()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=to_dataset(sft_rows(samples)),
        processing_class=processor,
        callbacks=[timer.callback()],
    )
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    tokens = trainer.state.num_input_tokens_seen or 0
    if not tokens:  # older transformers do not count; fall back to the logged num_tokens
        tokens = max((e.get("num_tokens", 0) for e in trainer.state.log_history), default=0)
    steady = timer.steps[1:] or timer.steps
    return {
        "steps": steps,
        "sequences_per_step": seq_batch,
        "s_per_step_first": round(timer.steps[0], 3),
        "s_per_step": round(sum(steady) / len(steady), 3),
        "tokens_per_s": round(tokens / max(sum(timer.steps), 1e-9), 1),
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "loss": [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e],
    }


def grpo_step(
    model_dir: Path,
    work: Path,
    samples: list[Any],
    zero: str,
    budget: int,
    generations: int,
    prompts: int,
) -> dict[str, Any]:
    import torch
    from trl import GRPOConfig, GRPOTrainer

    from visionr1_jobs.config import GRPOParams
    from visionr1_jobs.training.data import grpo_rows, to_dataset
    from visionr1_jobs.training.rewards import reward_functions

    params = GRPOParams(deepspeed=zero, save_steps=10_000, logging_steps=1)
    batches = runtime.grpo_batches(prompts, generations, 1, None)
    ds_path = runtime.write_deepspeed_config(zero, True, work)
    funcs, weights = reward_functions("hard_format_result", 5.0)
    args = GRPOConfig(
        **runtime.common_training_kwargs(params, work / "grpo", True, ds_path),
        learning_rate=1e-6,
        max_steps=1,
        num_generations=generations,
        max_completion_length=budget,
        per_device_train_batch_size=batches.per_device,
        gradient_accumulation_steps=batches.grad_accum,
        beta=0.01,
        epsilon=0.2,
        loss_type="grpo",
        reward_weights=weights,
        remove_unused_columns=False,
        use_vllm=False,
    )
    processor = runtime.load_processor(str(model_dir), None, None)
    model = runtime.load_model(str(model_dir), True)
    timer = _Timer()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=funcs,
        args=args,
        train_dataset=to_dataset(grpo_rows(samples)),
        processing_class=processor,
        callbacks=[timer.callback()],
    )
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    logs = next(e for e in trainer.state.log_history if "reward" in e)
    completions = prompts * generations
    tokens = logs["completions/mean_length"] * completions
    return {
        "completion_budget": budget,
        "completions": completions,
        "s_per_step": round(timer.steps[0], 3),
        "completion_tokens_per_s": round(tokens / timer.steps[0], 1),
        "mean_completion_length": logs["completions/mean_length"],
        "clipped_ratio": logs["completions/clipped_ratio"],
        "kl": logs.get("kl"),
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers at 7B width")
    parser.add_argument("--vision-depth", type=int, default=2)
    parser.add_argument("--zero", choices=["zero2", "zero3"], default="zero3")
    parser.add_argument("--sft-steps", type=int, default=3)
    parser.add_argument("--sft-batch", type=int, default=4)
    parser.add_argument("--budget", type=int, default=256, help="GRPO completion budget (tokens)")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 1
    import deepspeed
    import transformers
    import trl

    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "deepspeed": deepspeed.__version__,
        "zero": args.zero,
        "dtype": "bfloat16",
    }
    with tempfile.TemporaryDirectory(prefix="visionr1-devcheck-") as tmp:
        root = Path(tmp)
        t0 = time.time()
        model_dir, n = build_model(root / "model", args.layers, args.vision_depth)
        report["model"] = {
            "layers": args.layers,
            "hidden": 3584,
            "parameters": n,
            "build_s": round(time.time() - t0, 1),
        }
        samples = _samples(root, 32)
        for name, fn in (
            (
                "sft",
                lambda: sft_step(
                    model_dir, root, samples, args.zero, args.sft_steps, args.sft_batch
                ),
            ),
            (
                "grpo",
                lambda: grpo_step(
                    model_dir, root, samples, args.zero, args.budget, args.generations, args.prompts
                ),
            ),
        ):
            try:
                report[name] = fn()
            except Exception as exc:  # report both checks even when one fails
                report[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            torch.cuda.empty_cache()
    print("DEVICE_CHECK " + json.dumps(report), flush=True)
    return 0 if all("error" not in report[k] for k in ("sft", "grpo")) else 1


if __name__ == "__main__":
    sys.exit(main())
