"""The comparison pipeline behind `compare` and `demo`: the papers' baselines side by side under one budget.

run.py (the `compare` command: shared stages, then every (method, seed) in its own process), mixture.py and
distillation.py (one function per method), stages.py (a command run as a resumable stage; the evaluation stages),
statistics.py (CIs, paired differences, the claims), report.py (results.md / results.json and plots), data.py
(the built-in experiment data), demo.py and demo_report.py (the `demo` command: compare at a small size).
It sits above lmrefinery.recipes: its stages are the single-stage commands.
"""
