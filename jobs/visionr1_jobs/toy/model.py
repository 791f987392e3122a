"""A tiny Qwen2.5-VL with random weights and a locally trained tokenizer: no hub access.

It runs every stage through the real transformers/TRL code paths on a laptop CPU. The
tokenizer is a byte-level BPE trained on toy questions, answers and R1-style reasoning, so the
reasoning tags ``<think>``, ``</think>``, ``<answer>``, ``</answer>`` are ordinary tokens
(never stripped by ``skip_special_tokens``); Qwen's chat and vision markers are special tokens,
and the chat template renders Qwen2.5-VL's ``<|im_start|>role\\n…<|im_end|>`` format.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from visionr1_jobs.toy.world import make_problem

#: Special tokens, in id order right after the BPE vocabulary (Qwen's names).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
REASONING_TAGS: tuple[str, ...] = ("<think>", "</think>", "<answer>", "</answer>")

# Qwen2's pre-tokenizer split (contractions, letter runs, single digits, punctuation runs, spaces).
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2.5-VL's prompt format, written for this project. `{% generation %}` marks the assistant
# text so TRL can build an assistant-only loss mask (return_assistant_tokens_mask).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>{% endgeneration %}\n"
    "{% else %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Image sizes the tiny processor accepts (pixels): a 112×112 toy image stays 16 vision tokens.
MIN_PIXELS = 28 * 28
MAX_PIXELS = 112 * 112


# Words of geometry, charts and step-by-step reasoning: real prompts (LLaVA-CoT, Mulberry,
# MathVista) use them, and a vocabulary of a few thousand keeps sequences short.
_VOCAB_TEXT = """
the a an of to in is are was were be been this that these those there here it its and or but not
if then else so because therefore thus hence since which what who whom whose where when why how
many much more most less least few several each every all any some none both either neither one
two three four five six seven eight nine ten eleven twelve twenty thirty forty fifty hundred
thousand first second third fourth last next previous number numbers value values total sum
difference product quotient ratio percent percentage average mean median mode maximum minimum
greater smaller larger less equal equals unequal add added adding plus minus times divide divided
multiply multiplied subtract subtracted count counted counting shape shapes circle circles square
squares triangle triangles rectangle rectangles polygon line lines segment segments angle angles
degree degrees radius diameter chord arc tangent perimeter area volume length width height side
sides base slant hypotenuse parallel perpendicular bisector midpoint vertex vertices diagonal
diagonals point points coordinate coordinates axis graph chart bar bars pie plot table column
columns row rows label labels legend scale unit units color colors red blue green orange purple
black white yellow gray brown pink tallest shortest highest lowest biggest smallest left right
top bottom middle center above below between inside outside near far image picture figure
diagram photo shows shown show showing depicts depicted see seen look looking notice observe
question questions answer answers choice choices option options correct incorrect wrong right
true false yes no maybe probably likely exactly approximately about around nearly final
solution solve solving step steps reasoning reason think thinking thought wait hmm okay let me
check double verify verified recheck recount confirm calculation calculate calculated compute
computed formula formulas equation equations expression variable variables given known unknown
find determine find out we need to so the answer should be because of using use used apply
applying substitute substituting plug plugging into gives give get got result results means
mean implies therefore conclude conclusion summary caption description describe described
context hint please provide select directly based on following problem problems statement
theorem property properties congruent similar isosceles equilateral right acute obtuse
triangle's circle's sine cosine square root fraction decimal integer negative positive zero
even odd prime factor multiple pattern sequence function slope intercept probability
"""


def _corpus(seed: int, n: int = 600) -> list[str]:
    """Toy questions, answers and the toy reasoner's chains of thought, so the BPE learns the
    words and phrases used later (short sequences keep every stage fast on a CPU)."""
    from visionr1_jobs.synthesis import toy_logic

    rng = random.Random(f"visionr1-toy-tokenizer:{seed}")
    lines = []
    for _ in range(n):
        p = make_problem(rng)
        description = toy_logic.describe_scene(p.scene)
        prompt = f"### Image description\n{description}\n\n### Question\n{p.question}\n\n"
        response, _ = toy_logic.reason(prompt, rng, 0.2, 0.0)
        lines.append(response)
        lines.append(response.replace("The description says", "The image shows"))
        lines.append(f"Question: {p.question}\nAnswer: {p.answer}\n{description}")
    lines.append(
        " ".join(str(i) for i in range(200)) + " 0.5 1.25 -3 + - * / = ( ) [ ] { } \\frac \\sqrt"
    )
    lines.append("system user assistant You are a helpful assistant. A B C D E yes no")
    words = _VOCAB_TEXT.split()
    for _ in range(n // 4):
        lines.append(" ".join(rng.choice(words) for _ in range(24)))
    return lines


def train_tokenizer(vocab_size: int = 3000, seed: int = 0) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on the toy corpus, with Qwen's specials."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    # Added (not special) so each tag is one token and survives skip_special_tokens=True.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TAGS])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def build_processor(vocab_size: int = 3000, seed: int = 0) -> Any:
    """Tokenizer + Qwen2-VL image processor (+ video processor) as a Qwen2_5_VLProcessor."""
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor, Qwen2VLImageProcessor

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(vocab_size, seed),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        padding_side="left",  # decoder-only generation pads on the left
        model_max_length=8192,
        chat_template=CHAT_TEMPLATE,
    )
    image_processor = Qwen2VLImageProcessor(
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
    )
    kwargs: dict[str, Any] = {}
    try:  # transformers 5 processors want a video processor too; tiny settings, never used
        from transformers import Qwen2VLVideoProcessor

        kwargs["video_processor"] = Qwen2VLVideoProcessor(
            min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS
        )
    except ImportError:
        pass
    return Qwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE, **kwargs
    )


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """The ids of :data:`SPECIAL_TOKENS` in ``tokenizer``."""
    return {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


def qwen2_5_vl_config(
    text: dict[str, Any], vision: dict[str, Any], token_ids: dict[str, int]
) -> Any:
    """A Qwen2_5_VLConfig of the given text and vision settings, wired to the tokenizer's
    special ids (the toy model's and the device check's full-size one alike)."""
    from transformers import Qwen2_5_VLConfig

    text = text | {
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": token_ids["<|im_end|>"],
        "pad_token_id": token_ids["<|endoftext|>"],
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=token_ids["<|image_pad|>"],
        video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"],
        vision_end_token_id=token_ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_config(
    tokenizer: Any, *, hidden: int = 64, layers: int = 2, vision_depth: int = 1
) -> Any:
    """A Qwen2_5_VLConfig a few hundred kB in size, wired to the tokenizer's special ids."""
    heads = 4
    head_dim = hidden // heads
    # M-RoPE splits each head's rotary half-dims over (time, height, width).
    half = head_dim // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": hidden * 4,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "max_position_embeddings": 8192,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": section,
        },
        "tie_word_embeddings": False,
    }
    vision = {
        "depth": vision_depth,
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_heads": 2,
        "out_hidden_size": hidden,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": list(range(vision_depth)),
    }
    return qwen2_5_vl_config(text, vision, special_token_ids(tokenizer))


def create_tiny_model(
    out: str | os.PathLike[str],
    *,
    seed: int = 0,
    vocab_size: int = 3000,
    hidden: int = 64,
    layers: int = 2,
    vision_depth: int = 1,
) -> Path:
    """Build and ``save_pretrained`` the tiny model and its processor into ``out``.

    Loads back with ``AutoModelForImageTextToText.from_pretrained(out)`` and
    ``AutoProcessor.from_pretrained(out)`` with ``HF_HUB_OFFLINE=1``. Written into a temporary
    folder and renamed into place, so ``out`` is either absent or complete.
    """
    import shutil
    import tempfile

    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    processor = build_processor(vocab_size, seed)
    tok = processor.tokenizer
    config = build_config(tok, hidden=hidden, layers=layers, vision_depth=vision_depth)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).float().eval()
    im_end, eot = (
        tok.convert_tokens_to_ids("<|im_end|>"),
        tok.convert_tokens_to_ids("<|endoftext|>"),
    )
    model.generation_config = GenerationConfig(
        eos_token_id=[im_end, eot],
        pad_token_id=eot,
        bos_token_id=eot,
        do_sample=False,
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        for f in tmp.iterdir():  # some writers create 0600 files; pods of other uids read these
            f.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
