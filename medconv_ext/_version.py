"""The package version: the single source (setup.py reads it from this file)."""
__version__ = "0.1.0"
