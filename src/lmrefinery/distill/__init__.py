"""FIRST distillation: the top-k teacher cache, the re-calibration transforms, and the distillation losses."""
