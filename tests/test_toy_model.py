"""`visionr1 toy model`: a tiny Qwen2.5-VL that loads with the Auto classes, offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from visionr1_operator.cli import main as visionr1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("m") / "tiny"
    assert visionr1(["toy", "model", "--out", str(out)]) == 0
    return out


def test_loads_back_offline_with_auto_classes(tiny: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    model = AutoModelForImageTextToText.from_pretrained(tiny)
    processor = AutoProcessor.from_pretrained(tiny)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    tok = processor.tokenizer
    assert 1000 <= len(tok) <= 4096
    assert json.loads((tiny / "config.json").read_text())[
        "image_token_id"
    ] == tok.convert_tokens_to_ids("<|image_pad|>")


def test_reasoning_tags_are_normal_tokens_and_vision_tokens_special(tiny: Path) -> None:
    from transformers import AutoProcessor

    tok = AutoProcessor.from_pretrained(tiny).tokenizer
    target = "<think> Okay, 3 circles. </think><answer> Final Answer:3 </answer>"
    ids = tok(target, add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        assert tag in pieces  # one token each
        assert tag not in tok.all_special_tokens
    assert tok.decode(ids, skip_special_tokens=True) == target
    for special in (
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|image_pad|>",
        "<|vision_end|>",
        "<|endoftext|>",
    ):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
        assert tok.decode(tok.convert_tokens_to_ids([special]), skip_special_tokens=True) == ""


def test_chat_template_and_image_generation(tiny: Path) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny)
    model = AutoModelForImageTextToText.from_pretrained(tiny)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>How many?<|im_end|>\n<|im_start|>assistant\n"
    )
    inputs = processor(
        text=[text], images=[Image.new("RGB", (112, 112), "red")], return_tensors="pt"
    )
    # 112×112 → 8×8 patches of 14 px → 2×2 merge → 16 image tokens.
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 16
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
