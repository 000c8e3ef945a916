"""The loop around the step: epochs, bookkeeping, optimisers, logging (supcon/__init__.py has
the map)."""
