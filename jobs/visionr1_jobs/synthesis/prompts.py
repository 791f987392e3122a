"""The modality-bridging prompts: versioned text files shipped with the package.

The paper did not publish its prompts (method.md §2), so ours live in
``visionr1_jobs/prompts/<version>/<step>.txt``, are selected by ``params.promptsVersion``, and are
logged to MLflow with their sha256 so every synthesized row can be traced to the exact wording.

Placeholders are ``{{name}}`` (not ``str.format``: questions and descriptions are full of LaTeX
braces). A template may use only the names its step provides; anything else is refused at load.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

from visionr1_jobs.contract import InvalidInput

#: step → the placeholders it may use (and must use, for the ones listed as required).
STEPS: dict[str, tuple[set[str], set[str]]] = {
    "pseudo_cot": ({"question", "answer"}, {"question", "answer"}),
    "description": ({"question", "answer", "pseudo_cot"}, {"question", "pseudo_cot"}),
    "reasoner": ({"question", "description"}, {"question", "description"}),
    "reasoner_with_answer": (
        {"question", "description", "answer"},
        {"question", "description", "answer"},
    ),
}
_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")


@dataclass(frozen=True)
class Prompt:
    """One prompt template with its identity."""

    step: str
    version: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def render(self, **values: str) -> str:
        """Fill the placeholders; a missing value is a bug in the caller (KeyError)."""
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.text)


def load_prompts(version: str) -> dict[str, Prompt]:
    """Every step's template of ``version``, checked for unknown or missing placeholders."""
    root = resources.files("visionr1_jobs") / "prompts" / version
    if not root.is_dir():
        known = sorted(
            p.name
            for p in (resources.files("visionr1_jobs") / "prompts").iterdir()
            if p.is_dir() and not p.name.startswith(("_", "."))
        )
        raise InvalidInput(f"params.promptsVersion {version!r}: no such prompt set (have {known})")
    out: dict[str, Prompt] = {}
    for step, (allowed, required) in STEPS.items():
        file = root / f"{step}.txt"
        if not file.is_file():
            raise InvalidInput(f"prompt set {version!r} lacks {step}.txt")
        text = file.read_text(encoding="utf-8")
        used = set(_PLACEHOLDER.findall(text))
        if used - allowed or required - used:
            raise InvalidInput(
                f"prompts/{version}/{step}.txt: placeholders {sorted(used)}; allowed "
                f"{sorted(allowed)}, required {sorted(required)}"
            )
        out[step] = Prompt(step, version, text)
    return out
