"""Training machinery shared by every recipe: distributed setup, optimizer and schedule, loss accumulation,
checkpoints, metrics."""
