"""Synthesis by modality bridging: prompts, the three teacher steps, shards, toy stand-ins."""
