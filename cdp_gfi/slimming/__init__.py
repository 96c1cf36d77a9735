"""Slimming: masks made physical through NNI's ModelSpeedup, and slim networks as files."""
