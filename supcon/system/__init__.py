"""Devices, processes and files (supcon/__init__.py has the map)."""
