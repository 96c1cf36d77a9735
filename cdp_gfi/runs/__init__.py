"""Runs: the CIFAR run and sweeps, ImageNet stages 1 and 2, the NNI trial, their reports and flags."""
