"""Density-Based Pruning of web-scale image-text datasets (arXiv 2401.04578)."""

__version__ = "0.1.0"
