"""Latency as the pruning target: a per-unit latency table measured on the device, and the selection it drives."""
