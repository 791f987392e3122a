"""The toy world: visual-math problems with known answers and a tiny Qwen2.5-VL, no hub needed."""
