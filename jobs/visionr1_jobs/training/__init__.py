"""Training machinery shared by the SFT and GRPO stage programs (TRL trainers underneath).

Heavy imports (torch, transformers, TRL, MLflow) happen inside functions, except in
``callbacks`` (which subclasses transformers' TrainerCallback and is imported only by the
stages' training paths); vLLM and DeepSpeed are only looked up, and imported by TRL/transformers
when a run asks for them.
"""
