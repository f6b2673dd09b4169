"""Reward heads: each returns a differentiable score and, optionally, a heatmap of what is wrong."""

from fnf.rewards.base import RewardHead, RewardOutput
from fnf.rewards.color_region import ColorRegion
from fnf.rewards.contract import check_head
from fnf.rewards.nudenet_safety import NudeNetSafety  # imports nudenet / onnx only when built: optional extra
from fnf.rewards.open_clip_alignment import OpenCLIPAlignment
from fnf.rewards.rahf import RAHFHeatmap
from fnf.rewards.rahf_reproduction import RAHFReproductionHeatmap
from fnf.rewards.saliency import Saliency
from fnf.rewards.shapes import ShapesAlignment, ShapesArtifact, ShapesSafety

__all__ = ["ColorRegion", "NudeNetSafety", "OpenCLIPAlignment", "RAHFHeatmap", "RAHFReproductionHeatmap", "RewardHead",
           "RewardOutput", "Saliency", "ShapesAlignment", "ShapesArtifact", "ShapesSafety", "check_head"]
