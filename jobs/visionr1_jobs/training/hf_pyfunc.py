"""MLflow models-from-code wrapper for a trained checkpoint (logged by the SFT and GRPO stages).

``mlflow.pyfunc.load_model(uri).predict(df)`` takes a DataFrame with a ``question`` column and an
optional ``image`` column (file paths) and returns the generated assistant texts. Params:
``max_new_tokens`` (default 512), ``temperature`` (0 = greedy, the default).
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class HFGenerator(PythonModel):
    """Loads the HF folder logged as artifact ``hf_model`` and generates with transformers."""

    def load_context(self, context: Any) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = context.artifacts["hf_model"]
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForImageTextToText.from_pretrained(path).eval()

    # No annotations on purpose: MLflow derives (and warns about) an input schema from them.
    def predict(self, context, model_input, params=None):
        import torch
        from PIL import Image

        params = params or {}
        max_new = int(params.get("max_new_tokens", 512))
        temperature = float(params.get("temperature", 0.0))
        rows = (
            model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        )
        outputs = []
        for row in rows:
            content: list[dict[str, Any]] = []
            images = []
            if row.get("image"):
                images.append(Image.open(row["image"]).convert("RGB"))
                content.append({"type": "image"})
            content.append({"type": "text", "text": str(row["question"])})
            text = self.processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
            inputs = self.processor(text=[text], images=images or None, return_tensors="pt")
            with torch.no_grad():
                out = self.model.generate(
                    **inputs,
                    max_new_tokens=max_new,
                    do_sample=temperature > 0,
                    temperature=temperature if temperature > 0 else None,
                )
            new = out[0, inputs["input_ids"].shape[1] :]
            outputs.append(self.processor.decode(new, skip_special_tokens=True))
        return outputs


mlflow.models.set_model(HFGenerator())
