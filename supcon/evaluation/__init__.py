"""Measuring an encoder: features, kNN, retrieval, classifier metrics (supcon/__init__.py has
the map)."""
