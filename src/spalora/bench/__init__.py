"""Benchmarks of the protocol (docs/results): accuracy at equal budget, speed and memory per
step, and how well fine-tuning updates compress (`spalora bench ...`, `spalora analyze`)."""
