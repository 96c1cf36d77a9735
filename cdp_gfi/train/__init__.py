"""Training: the fine-tuning loop, optimiser and schedule, BatchNorm re-estimation."""
