"""The transformers backend on the tiny toy model, and the backend factory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from visionr1_jobs.config import Backend
from visionr1_jobs.contract import InvalidInput
from visionr1_jobs.generation import (
    Generation,
    GenerationBackend,
    get_backend,
    register_backend,
    resolve_kind,
    user,
)
from visionr1_jobs.toy.model import create_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    d = tmp_path_factory.mktemp("img")
    out = []
    for i, color in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (112, 112), color).save(d / f"{i}.png")
        out.append(str(d / f"{i}.png"))
    return out


def test_generates_from_image_prompts_batched_like_one_by_one(
    tiny: Path, images: list[str]
) -> None:
    gen = get_backend(Backend(kind="transformers", batch_size=2), str(tiny))
    assert gen.kind == "transformers" and gen.device == "cpu"
    reqs = [
        user("How many circles are there in the image?", [images[0]]),
        user("Sum?", [images[1]]),
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Text only, no image."},
            ]
        },
    ]
    outs = gen.generate(reqs, temperature=0, max_tokens=6)
    assert all(isinstance(o, Generation) and o.text for o in outs)
    # Random weights never stop within 6 tokens: every answer hits the limit.
    assert [(o.completion_tokens, o.finish_reason) for o in outs] == [(6, "length")] * 3
    # The longer question has more prompt tokens; images add 16 vision tokens each.
    assert outs[0].prompt_tokens > outs[1].prompt_tokens
    # Left padding: a request gives the same greedy text alone as inside a padded batch.
    assert [gen.generate([r], temperature=0, max_tokens=6)[0].text for r in reqs] == [
        o.text for o in outs
    ]
    a = gen.generate(reqs[:2], temperature=1.0, top_p=0.9, max_tokens=6, seed=5)
    b = gen.generate(reqs[:2], {"temperature": 1.0, "top_p": 0.9, "max_tokens": 6, "seed": 5})
    assert [o.text for o in a] == [o.text for o in b]  # seeded sampling is reproducible
    gen.close()


def test_stops_at_the_end_of_turn_token(tiny: Path, images: list[str], tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    req = [user("How many?", [images[2]])]
    first = get_backend(Backend(kind="transformers"), str(tiny))
    # The ids the model generated (re-tokenizing the decoded text need not give them back).
    generated: list[int] = []
    model_generate = first.model.generate  # type: ignore[attr-defined]

    def spy(**kwargs: object) -> object:
        out = model_generate(**kwargs)
        generated[:] = out[0, kwargs["input_ids"].shape[1] :].tolist()  # type: ignore[attr-defined]
        return out

    first.model.generate = spy  # type: ignore[attr-defined]
    first.generate(req, temperature=0, max_tokens=4)
    tok = AutoProcessor.from_pretrained(tiny).tokenizer
    second_token = generated[1]
    stop_at = generated.index(second_token)  # 1, unless the first token is the same one
    # A copy of the model whose end-of-turn is the token it generates second.
    shutil.copytree(tiny, tmp_path / "m")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "m")
    model.generation_config.eos_token_id = [second_token]
    model.generation_config.save_pretrained(tmp_path / "m")
    (out,) = get_backend(Backend(kind="transformers"), str(tmp_path / "m")).generate(
        req, temperature=0, max_tokens=4
    )
    assert (out.finish_reason, out.completion_tokens) == ("stop", stop_at + 1)
    assert out.text == tok.decode(generated[:stop_at], skip_special_tokens=True)


def test_factory_kinds_and_registration_hook() -> None:
    assert resolve_kind("auto") == "transformers"  # no vLLM / CUDA here
    with pytest.raises(InvalidInput, match="needs a model"):
        get_backend(Backend(kind="transformers"))
    with pytest.raises(InvalidInput, match="unknown backend kind 'nope'"):
        get_backend(Backend.model_construct(kind="nope", model="m"))

    class Echo(GenerationBackend):
        kind = "echo"

        def _generate(self, requests, sampling):  # type: ignore[no-untyped-def]
            return [Generation(r.messages[-1]["content"] * sampling.max_tokens) for r in requests]

    register_backend("echo", lambda cfg, default_model: Echo())
    gen = get_backend(Backend.model_construct(kind="echo", model=None))
    assert [o.text for o in gen.generate([user("ab")], max_tokens=2)] == ["abab"]
    assert gen.generate([]) == []
