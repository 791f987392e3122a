"""Training machinery shared by the SFT and GRPO stage programs (TRL trainers underneath).

Modules import torch/transformers/TRL only inside functions where they can, so importing a
module here stays cheap; vLLM and DeepSpeed are imported only when chosen.
"""
