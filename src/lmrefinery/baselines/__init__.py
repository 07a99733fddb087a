"""The papers' baselines as library functions: LESS-style and RHO-style selection scores, weighted mixtures and
token budgets (mixture.py), post-hoc temperature scaling."""
