"""The GPU check's model is the real Qwen2.5-VL-7B architecture (counted on the meta device, so no
memory is used), and its samples carry images at the recipe's budget and ~4k-token completions."""

from __future__ import annotations

from pathlib import Path

from visionr1_jobs.training import device_check


def _token_ids() -> dict[str, int]:
    from visionr1_jobs.toy.model import build_processor, special_token_ids

    return special_token_ids(build_processor().tokenizer)


def test_the_committed_config_is_qwen2_5_vl_7b() -> None:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = device_check.model_config(None, None, _token_ids())
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.model.visual.parameters())
    # The published checkpoint holds 8,292,166,656 parameters (8.29 B: 7.6 B language model,
    # 0.68 B vision tower with its merger).
    assert total == 8_292_166_656
    assert vision == 676_550_144
    assert config.text_config.num_hidden_layers == 28 and config.vision_config.depth == 32


def test_the_fallback_keeps_the_width() -> None:
    config = device_check.model_config(4, 8, _token_ids())
    assert config.text_config.num_hidden_layers == 4 and config.text_config.hidden_size == 3584
    assert config.vision_config.depth == 8 and config.vision_config.fullatt_block_indexes == [7]


def test_samples_have_budget_images_and_long_completions(tmp_path: Path) -> None:
    from PIL import Image

    from visionr1_jobs.toy.model import build_processor

    tok = build_processor().tokenizer
    samples = device_check._samples(tmp_path, 2, 4096, tok)
    for s in samples:
        with Image.open(s.images[0]) as im:
            assert im.size[0] * im.size[1] == device_check.MAX_PIXELS
        n = len(tok(s.response)["input_ids"])
        assert 3800 <= n <= 4400, n
