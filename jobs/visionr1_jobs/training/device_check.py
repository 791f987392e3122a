"""GPU check of both trainers at the paper's scale: one SFT run of a few steps and one GRPO step
on a randomly initialised Qwen2.5-VL-7B (the real architecture, from
``model_configs/qwen2_5_vl_7b.json``), with 4k-token completions and the released recipe's image
budget; prints tokens/s per GPU and peak GPU memory as one JSON line (``DEVICE_CHECK {...}``).

Run by ``scripts/device-check.sh`` under ``torchrun --nproc_per_node=1``. Uses the stages' own
helpers (processor, model loading, training kwargs, batches, data rows, the reward) but not
MLflow, so the GPU machine needs no tracking stack.

What fits one 139 GiB GPU, and what this check therefore runs by default:

* Full depth and width, bf16 weights (15.2 GB for 7.6 B parameters) and bf16 gradients (15.2 GB).
* AdamW with its two moments in bf16, the weights' dtype (30.4 GB), and no fp32 master copy: the
  recipe's ZeRO-3 with fp32 master weights and moments needs 7.6 B × 16 bytes = 122 GB before any
  activation, the logits or GRPO's reference model (another 15.2 GB), which is what it spreads
  over 8 or more GPUs. ZeRO on one GPU partitions nothing, so the default is ``--zero none``.
  ``--optim sgd`` (no optimizer state) and ``--layers N`` (fewer decoder layers at full width)
  are the fallbacks if memory runs out; the report names what ran.
* SFT: one sequence per step, as in the paper (per-device batch 1), of one image at the budget
  (~750 visual tokens) + the question + a ~4k-token completion.
* GRPO: one prompt × 16 completions (PTST stage 1) with a 4096-token budget. A random model
  almost never emits the end token, so every completion runs to the budget; rollouts use
  transformers' generate (this check does not need vLLM).

Image budget: the released cold-start config leaves LLaMA-Factory's ``image_max_pixels`` at its
default 768 × 768 = 589,824 pixels; the check's images are exactly that size.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from visionr1_jobs.training import runtime

CONFIG = Path(__file__).with_name("model_configs") / "qwen2_5_vl_7b.json"
#: The released cold-start recipe's image budget (LLaMA-Factory's default image_max_pixels).
MAX_PIXELS = 768 * 768


def _log(msg: str) -> None:
    print(f"[device-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def model_config(layers: int | None, vision_depth: int | None, token_ids: dict[str, int]) -> Any:
    """The committed Qwen2.5-VL-7B config, with the tokenizer's special ids; optionally fewer
    decoder layers or vision blocks (the fallback when memory runs out)."""
    from visionr1_jobs.toy.model import qwen2_5_vl_config

    raw = json.loads(CONFIG.read_text())
    text, vision = dict(raw["text_config"]), dict(raw["vision_config"])
    if layers:
        text["num_hidden_layers"] = layers
        text["max_window_layers"] = layers
    if vision_depth:
        vision["depth"] = vision_depth
        vision["fullatt_block_indexes"] = [
            i for i in vision["fullatt_block_indexes"] if i < vision_depth
        ] or [vision_depth - 1]
    return qwen2_5_vl_config(text, vision, token_ids)


def build_model(out: Path, layers: int | None, vision_depth: int | None) -> tuple[Path, int]:
    """Random bf16 weights built on the GPU (seconds, not the minutes a CPU init of 8 B
    parameters takes) and saved with the toy processor (no hub access needed)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from visionr1_jobs.toy.model import build_processor, special_token_ids

    processor = build_processor()
    ids = special_token_ids(processor.tokenizer)
    config = model_config(layers, vision_depth, ids)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    processor.save_pretrained(out)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out, n


def _samples(root: Path, n: int, completion_tokens: int, tokenizer: Any) -> list[Any]:
    """Toy problems with images at the budget and a ~``completion_tokens`` reasoning each."""
    from PIL import Image

    from visionr1_jobs.data.load import load_dataset_dir
    from visionr1_jobs.toy.dataset import write_toy_dataset

    write_toy_dataset(root / "toy", n, seed=0, n_rl=n, n_bench=1)
    side = int(MAX_PIXELS**0.5)
    samples = load_dataset_dir(root / "toy" / "train", "toy")
    big = root / "images"
    big.mkdir(exist_ok=True)
    for s in samples:
        paths = []
        for i, p in enumerate(s.images):
            dest = big / f"{s.id}-{i}.png"
            with Image.open(p) as im:
                im.convert("RGB").resize((side, side)).save(dest)
            paths.append(str(dest))
        s.images = paths
        step = f"Looking again at the image, {s.question.lower()} Wait, let me count once more. "
        per = max(1, len(tokenizer(step)["input_ids"]))
        repeats = max(1, completion_tokens // per)
        # Repeated steps merge at their seams, so a step alone overestimates: top up to the budget.
        while len(tokenizer(step * (repeats + 1))["input_ids"]) <= completion_tokens:
            repeats += 1
        thinking = step * repeats
        s.response = (
            f"<think> {thinking}The count gives {s.answer}. </think>"
            f"<answer> Final Answer:{s.answer} </answer>"
        )
    return samples


class _Timer:
    """Times each optimizer step (CUDA-synchronised)."""

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
                _log(f"step {state.global_step}: {timer.steps[-1]:.1f} s")

        return _CB()


def _memory() -> dict[str, float]:
    import torch

    return {
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
    }


def _training_kwargs(params: Any, out: Path, zero: str, optim: str, work: Path) -> dict[str, Any]:
    ds_path = runtime.write_deepspeed_config(zero, True, work) if zero != "none" else None
    kwargs = runtime.common_training_kwargs(params, out, True, ds_path)
    return kwargs | {"optim": optim, "save_strategy": "no"}


def sft_step(
    model_dir: Path, work: Path, samples: list[Any], zero: str, optim: str, steps: int
) -> dict[str, Any]:
    import torch
    from trl import SFTConfig, SFTTrainer

    from visionr1_jobs.config import SFTParams
    from visionr1_jobs.training.data import sft_rows, to_dataset

    params = SFTParams(deepspeed=zero, save_steps=10_000, logging_steps=1)
    args = SFTConfig(
        **_training_kwargs(params, work / "sft", zero, optim, work),
        learning_rate=5e-6,
        max_steps=steps,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1,
        max_length=16384,
        completion_only_loss=True,
    )
    processor = runtime.load_processor(str(model_dir), None, MAX_PIXELS)
    model = runtime.load_model(str(model_dir), True)
    timer = _Timer()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=to_dataset(sft_rows(samples[: steps * 2])),
        processing_class=processor,
        callbacks=[timer.callback()],
    )
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    tokens = trainer.state.num_input_tokens_seen or 0
    if not tokens:  # fall back to TRL's logged running total
        tokens = max((e.get("num_tokens", 0) for e in trainer.state.log_history), default=0)
    steady = timer.steps[1:] or timer.steps
    out = {
        "steps": steps,
        "sequences_per_step": 1,
        "tokens_per_sequence": round(tokens / steps),
        "s_per_step_first": round(timer.steps[0], 3),
        "s_per_step": round(sum(steady) / len(steady), 3),
        "tokens_per_s_per_gpu": round(tokens / steps / (sum(steady) / len(steady)), 1),
        "loss": [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e],
        **_memory(),
    }
    del trainer, model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def grpo_step(
    model_dir: Path,
    work: Path,
    samples: list[Any],
    zero: str,
    optim: str,
    budget: int,
    generations: int,
    prompts: int,
    per_device: int,
) -> dict[str, Any]:
    import torch
    from trl import GRPOConfig, GRPOTrainer

    from visionr1_jobs.config import GRPOParams
    from visionr1_jobs.training.data import grpo_rows, to_dataset
    from visionr1_jobs.training.rewards import reward_functions

    params = GRPOParams(deepspeed=zero, save_steps=10_000, logging_steps=1)
    batches = runtime.grpo_batches(prompts, generations, 1, per_device)
    funcs, weights = reward_functions("hard_format_result", 5.0)
    args = GRPOConfig(
        **_training_kwargs(params, work / "grpo", zero, optim, work),
        learning_rate=1e-6,
        max_steps=1,
        num_generations=generations,
        max_completion_length=budget,
        per_device_train_batch_size=batches.per_device,
        gradient_accumulation_steps=batches.grad_accum,
        beta=0.01,
        epsilon=0.2,
        loss_type="grpo",
        temperature=1.0,
        reward_weights=weights,
        remove_unused_columns=False,
        use_vllm=False,
    )
    processor = runtime.load_processor(str(model_dir), None, MAX_PIXELS)
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
    completion_tokens = logs["completions/mean_length"] * completions
    out = {
        "completion_budget": budget,
        "completions": completions,
        "per_device_batch": batches.per_device,
        "gradient_accumulation": batches.grad_accum,
        "s_per_step": round(timer.steps[0], 3),
        "completion_tokens_per_s_per_gpu": round(completion_tokens / timer.steps[0], 1),
        # Prompt + completion tokens of the step (TRL's running count), generation included.
        "tokens_per_s_per_gpu": round(float(logs.get("num_tokens", 0)) / timer.steps[0], 1),
        "mean_completion_length": logs["completions/mean_length"],
        "clipped_ratio": logs["completions/clipped_ratio"],
        "kl": logs.get("kl"),
        "reference_model": True,
        **_memory(),
    }
    del trainer, model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def _scratch() -> Path:
    """Where the 15 GB checkpoint goes: RAM-backed /dev/shm when it has room, else /tmp."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 40 * 2**30:
        return Path(tempfile.mkdtemp(prefix="visionr1-devcheck-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="visionr1-devcheck-"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: 28)")
    parser.add_argument("--vision-depth", type=int, default=None, help="vision blocks (32)")
    parser.add_argument("--zero", choices=["none", "zero2", "zero3"], default="none")
    parser.add_argument("--optim", choices=["adamw_torch", "sgd"], default="adamw_torch")
    parser.add_argument("--sft-steps", type=int, default=3)
    parser.add_argument("--completion-tokens", type=int, default=4096, help="SFT target length")
    parser.add_argument("--budget", type=int, default=4096, help="GRPO completion budget (tokens)")
    parser.add_argument("--generations", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=1)
    parser.add_argument("--per-device", type=int, default=4, help="GRPO micro-batch")
    parser.add_argument("--only", choices=["sft", "grpo"], default=None)
    parser.add_argument("--out", default=os.environ.get("OUT"), help="also write the JSON here")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 1
    import transformers
    import trl

    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "gpu_mem_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "zero": args.zero,
        "optimizer": args.optim + (" (states in bf16)" if args.optim == "adamw_torch" else ""),
        "dtype": "bfloat16",
        "max_pixels": MAX_PIXELS,
        "gradient_checkpointing": True,
    }
    if args.zero != "none":
        import deepspeed

        report["deepspeed"] = deepspeed.__version__
    root = _scratch()
    try:
        t0 = time.time()
        _log("building the model on the GPU")
        model_dir, n = build_model(root / "model", args.layers, args.vision_depth)
        raw = json.loads(CONFIG.read_text())
        report["model"] = {
            "config": CONFIG.name,
            "layers": args.layers or raw["text_config"]["num_hidden_layers"],
            "vision_depth": args.vision_depth or raw["vision_config"]["depth"],
            "hidden": raw["text_config"]["hidden_size"],
            "parameters": n,
            "build_and_save_s": round(time.time() - t0, 1),
        }
        _log(f"model: {n / 1e9:.2f} B parameters in {time.time() - t0:.0f} s")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        samples = _samples(root, 16, args.completion_tokens, tokenizer)
        checks = {
            "sft": lambda: sft_step(
                model_dir, root, samples, args.zero, args.optim, args.sft_steps
            ),
            "grpo": lambda: grpo_step(
                model_dir,
                root,
                samples,
                args.zero,
                args.optim,
                args.budget,
                args.generations,
                args.prompts,
                args.per_device,
            ),
        }
        for name, fn in checks.items():
            if args.only and name != args.only:
                continue
            _log(f"{name}: starting")
            t1 = time.time()
            try:
                report[name] = fn()
            except Exception as exc:  # report both checks even when one fails
                report[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000], **_memory()}
                gc.collect()
                torch.cuda.empty_cache()
            report[name]["wall_s"] = round(time.time() - t1, 1)
            _log(f"{name}: {json.dumps(report[name])}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    line = json.dumps(report)
    print("DEVICE_CHECK " + line, flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "device_check.json").write_text(line + "\n")
    ran = [k for k in ("sft", "grpo") if k in report]
    return 0 if ran and all("error" not in report[k] for k in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
