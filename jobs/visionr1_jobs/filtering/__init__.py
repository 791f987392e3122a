"""The filter: per-sample rules, worker-process judging, dedupe (method.md §3)."""
