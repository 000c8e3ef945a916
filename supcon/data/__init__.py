"""What the networks read: data sets, loaders, transforms, and the capabilities that shape the
training data (supcon/__init__.py has the map)."""
