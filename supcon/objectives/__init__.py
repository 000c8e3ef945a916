"""What a training step computes: the loss and what it needs (supcon/__init__.py has the map)."""
