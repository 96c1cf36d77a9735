"""Filter scores: CDP's TF-IDF and GFI-AP's importance, and how layers' scores are made comparable."""
