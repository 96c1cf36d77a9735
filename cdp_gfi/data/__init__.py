"""Data: datasets and the loaders and samplers that read them."""
