"""Phalanx: fast, correct data-parallel training of CNN image classifiers on PyTorch's distributed engine."""
__version__ = "0.1.0"
