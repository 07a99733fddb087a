"""FIRST (docs/methods/first.md), all of it: the teacher's top-k extraction (topk.py), the cache format (cache.py), the
temperature search (temperature.py), every distillation loss (losses.py) and student initialisation (student.py)."""
