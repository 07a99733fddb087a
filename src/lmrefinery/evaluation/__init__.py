"""Evaluation: held-out loss per source (and, later, multiple-choice accuracy and calibration)."""
