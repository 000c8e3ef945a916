"""Using a trained model: rebuilding it from its checkpoint, predictions, export
(supcon/__init__.py has the map)."""
