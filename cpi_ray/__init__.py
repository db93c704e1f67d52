"""cpi-ray: Core Parameter Isolation Fine-Tuning on Ray."""

__version__ = "0.1.0"
