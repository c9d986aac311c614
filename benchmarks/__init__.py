"""The research harness beside the library: accuracy at equal budget, speed and memory per step,
and how well fine-tuning updates compress. Run from the repository root:
`python -m benchmarks accuracy|speed|analyze ...` (docs/benchmarks.md)."""
