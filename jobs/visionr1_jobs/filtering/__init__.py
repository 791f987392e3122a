"""The filter: per-sample rules, worker-process judging, dedupe (VISION-R1.md §3)."""
