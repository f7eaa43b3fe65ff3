"""What the user sees: rank-0 console and progress bar, per-rank log files, metrics.jsonl, plots."""
