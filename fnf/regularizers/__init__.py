"""Swappable fidelity terms outside the mask; short names work in YAML (``class_path: PixelFrobenius``)."""

from fnf.regularizers.base import Regularizer
from fnf.regularizers.latent import LatentFrobenius
from fnf.regularizers.none import NoRegularizer
from fnf.regularizers.pixel import PixelFrobenius

__all__ = ["LatentFrobenius", "NoRegularizer", "PixelFrobenius", "Regularizer"]
