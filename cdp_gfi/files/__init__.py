"""Files: atomic checkpoints and strict loads, published checkpoint layouts, compact mask files."""
