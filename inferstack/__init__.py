"""Inference Stack: the console script, the model registry and settings shared by all components."""

__version__ = "0.1.0"
