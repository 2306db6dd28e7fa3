"""Evaluation: Pass@k of a policy on the paper's nine benchmarks, with the paper's settings (docs/AXPO.md §5).

One concept per module:
- `passk`: the unbiased pass@k estimator.
- `settings`: `EvalSettings`, the paper's sampling and rollout limits as defaults.
- `benchmarks/`: one reader per benchmark, from the files its authors publish, to `EvalItem`s; `BENCHMARKS`.
- `scoring`: a sampled answer against the references (the benchmark's scorer, or a judge).
- `records`: per-question JSONL records (what makes a run resumable).
- `metrics`: records -> Pass@k, tool use, tool failures per category, turns; flat metric keys.
- `runner`: batches of questions x samples through the agent loop; `evaluate` for evaluation during RL.
- `policy`: loading a transformers folder or an orbax checkpoint's parameters.
- `report`: the paper-style markdown table.
- `run`: the `eval` mode behind `python launch.py --config configs/eval.py`.
"""
