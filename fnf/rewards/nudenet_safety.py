"""NudeNet's exposed-body-part detector as a differentiable safety reward with a box heatmap (optional extra).

The detector (a YOLOv8 model, 320 px, whose ONNX file ships inside the ``nudenet`` wheel, so it runs
offline) is converted to a torch module by ``onnx2torch``: the score is a smooth maximum of its class
confidences, differentiable w.r.t. the pixels. Install with ``pip install fnf[nudenet]``; NudeNet and its
weights are AGPL-3.0. nudenet, onnx and onnx2torch are imported on construction only, so this module
imports without them.
"""

from __future__ import annotations

import ast
import importlib
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import nms

from fnf.rewards.base import RewardHead, RewardOutput, heatmap_wanted

EXPOSED = ("BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED",
           "ANUS_EXPOSED", "FEET_EXPOSED", "ARMPITS_EXPOSED", "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED")
"""Every ``*_EXPOSED`` class of NudeNet 3.4 (feet, armpits, belly and male breast among them)."""
SEXUAL = ("BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED",
          "ANUS_EXPOSED")
"""The exposed classes that make an image over-sexualised: the default ``classes``."""
NMS_IOU = 0.45
"""nudenet's own IoU threshold (``cv2.dnn.NMSBoxes(boxes, scores, 0.25, 0.45)``)."""


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"NudeNetSafety needs the optional extra: pip install fnf[nudenet] "
                          f"(cannot import {module!r})") from None


class NudeNetSafety(RewardHead):
    """score = −soft maximum over anchors and ``classes`` of NudeNet's class confidences (in [−1, 0], higher is
    safer); heatmap = the boxes NudeNet detects for ``classes``, padded and painted with their confidence (max
    where boxes overlap), all zero when nothing is detected. Detections as nudenet makes them: each anchor's most
    confident class over all of NudeNet's labels (>= ``threshold``), one class-agnostic NMS, then the boxes of
    ``classes`` (a region NudeNet calls covered is not painted for a weaker exposed guess). Use ``mask: heatmap``
    with ``model.masks.threshold`` <= ``threshold`` so every detected box becomes mask.

    Preprocessing is nudenet's ``NudeDetector.detect(path)``: zero padding at the bottom / right to a square,
    bilinear resize to the model's side, [0, 1] BGR channels (nudenet reads files with cv2, in BGR, and its two
    channel swaps cancel) -- here with ``F.interpolate``, so it stays differentiable, and antialiased by default
    (cv2's INTER_LINEAR is not: from 1024 px to 320 its gradient would reach ~40 % of the pixels, a grid).
    """

    gives_heatmap = "yes"

    def __init__(self, classes: Sequence[str] = SEXUAL, threshold: float = 0.25, box_padding: float = 0.1,
                 temperature: float = 0.02, channels: Literal["bgr", "rgb"] = "bgr",
                 weights: str | None = None, antialias: bool = True) -> None:
        """Load NudeNet's detector as a torch module.

        Args:
            classes: NudeNet class names that count as unsafe (default: the exposed buttocks, breasts,
                genitalia and anus, ``fnf.rewards.nudenet_safety.SEXUAL``, written out in the run's config and
                recipe; ``EXPOSED`` has every ``*_EXPOSED`` class); e.g. ``[FACE_FEMALE]`` to localise faces.
            threshold: confidence at or above which a box is a detection (nudenet's own: 0.25).
            box_padding: each detected box grows by this fraction of its width / height on every side.
            temperature: of the soft maximum τ·log mean exp(c / τ), which lies between the mean and the
                maximum confidence and tends to the maximum as τ → 0.
            channels: channel order fed to the detector: bgr (what nudenet's ``detect(path)`` feeds it) or rgb
                (YOLO's usual order; on scikit-image's coffee photo it lifts BUTTOCKS_EXPOSED from 0.21 to 0.30).
            weights: a NudeNet ONNX file (e.g. its 640m model); None: the 320n model inside the nudenet wheel.
            antialias: downscale with antialiasing, so the score's gradient reaches every pixel; false: nudenet's
                own resize (cv2 INTER_LINEAR) exactly, whose gradient skips pixels when an image is more than
                twice the detector's side (on scikit-image's 512 px astronaut the face's confidence moves by
                0.02 between the two).
        """
        nudenet, onnx = _require("nudenet"), _require("onnx")
        convert = _require("onnx2torch").convert
        super().__init__()
        path = Path(weights) if weights is not None else Path(nudenet.__file__).parent / "320n.onnx"
        if not path.is_file():
            raise FileNotFoundError(f"NudeNetSafety.weights: no such ONNX file {path}")
        model = onnx.load(str(path))
        metadata = {prop.key: prop.value for prop in model.metadata_props}
        if "names" not in metadata or "imgsz" not in metadata:
            raise ValueError(f"NudeNetSafety.weights: {path} is not a NudeNet (Ultralytics) ONNX detector: "
                             "its metadata has no 'names' / 'imgsz'")
        names = ast.literal_eval(metadata["names"])  # "{0: 'FEMALE_GENITALIA_COVERED', 1: 'FACE_FEMALE', ...}"
        self.labels = [names[i] for i in range(len(names))]
        self.resolution = ast.literal_eval(metadata["imgsz"])[0]
        classes = list(classes)
        unknown = [name for name in classes if name not in self.labels]
        if unknown or not classes:
            problem = f"unknown class {unknown[0]!r}" if unknown else "empty"
            raise ValueError(f"NudeNetSafety.classes: {problem}; choose from {self.labels}")
        if not 0 < threshold <= 1 or box_padding < 0 or temperature <= 0:
            raise ValueError("NudeNetSafety needs 0 < threshold <= 1, box_padding >= 0 and temperature > 0, got "
                             f"{threshold}, {box_padding}, {temperature}")
        if channels not in ("bgr", "rgb"):
            raise ValueError(f"NudeNetSafety.channels must be bgr or rgb, got {channels!r}")
        self.classes, self.threshold, self.box_padding = classes, threshold, box_padding
        self.temperature, self.channels, self.antialias = temperature, channels, antialias
        self.register_buffer("class_ids", torch.tensor([self.labels.index(name) for name in classes]),
                             persistent=False)
        self.detector = convert(model)
        self.requires_grad_(False).eval()

    def letterbox(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, 3, side, side) detector input, like nudenet's ``_read_image``."""
        _, _, height, width = images.shape
        pixels = images.float().flip(1) if self.channels == "bgr" else images.float()
        square = max(height, width)
        pixels = F.pad(pixels, (0, square - width, 0, square - height))  # black bottom / right, boxes keep (0, 0)
        size = (self.resolution, self.resolution)
        return F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=self.antialias)

    def raw(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> the detector's output (B, 4 + classes, anchors): box centre x, y,
        width, height in detector-input pixels, then one confidence in [0, 1] per class (``self.labels``)."""
        with warnings.catch_warnings():  # onnx2torch's Slice indexes with a list; torch 2.x warns but agrees
            warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
            return self.detector(self.letterbox(images))

    def forward(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        output = self.raw(images)
        confidence = output[:, 4:][:, self.class_ids].flatten(1)  # (B, classes · anchors)
        tau = self.temperature
        soft_max = tau * (torch.logsumexp(confidence / tau, dim=1) - math.log(confidence.shape[1]))
        if not heatmap_wanted():  # the tuned pass: no detections (their NMS reads boxes back to the host per image)
            return RewardOutput(score=-soft_max.float())
        with torch.no_grad():
            heatmap = self._heatmap(output.detach(), images.shape[-2:])
        return RewardOutput(score=-soft_max.float(), heatmap=heatmap.to(images.dtype))

    def detect(self, images: Tensor) -> list[list[tuple[str, float, tuple[float, float, float, float]]]]:
        """Per image, NudeNet's detections of ``classes``: (class, confidence, (x0, y0, x1, y1) in input pixels)."""
        with torch.no_grad():
            return self._detections(self.raw(images), images.shape[-2:])

    def _detections(self, output: Tensor, size: tuple[int, int]) -> list[list[tuple]]:
        height, width = size
        scale = max(height, width) / self.resolution  # the letterbox pads bottom / right only: no offset
        centre, extent = output[:, :2] * scale, output[:, 2:4] * scale
        boxes = torch.cat([centre - extent / 2, centre + extent / 2], 1).transpose(1, 2)  # (B, anchors, 4)
        limit = torch.tensor([width, height, width, height], device=output.device, dtype=output.dtype)
        boxes = boxes.clamp(min=0).minimum(limit)
        best, label = output[:, 4:].max(1)  # (B, anchors): each anchor's most confident of all labels
        found = []
        for b in range(output.shape[0]):
            (anchor,) = torch.nonzero(best[b] >= self.threshold, as_tuple=True)
            keep = anchor[nms(boxes[b, anchor], best[b, anchor], NMS_IOU)]  # class-agnostic, nudenet's IoU
            keep = keep[torch.isin(label[b, keep], self.class_ids)]
            found.append([(self.labels[i], s, tuple(box)) for i, s, box in
                          zip(label[b, keep].tolist(), best[b, keep].tolist(), boxes[b, keep].tolist())])
        return found

    def _heatmap(self, output: Tensor, size: tuple[int, int]) -> Tensor:
        height, width = size
        heatmap = output.new_zeros(output.shape[0], 1, height, width)
        for b, detections in enumerate(self._detections(output, size)):
            for _, score, (x0, y0, x1, y1) in detections:
                pad_x, pad_y = self.box_padding * (x1 - x0), self.box_padding * (y1 - y0)
                top, bottom = max(0, math.floor(y0 - pad_y)), min(height, math.ceil(y1 + pad_y))
                left, right = max(0, math.floor(x0 - pad_x)), min(width, math.ceil(x1 + pad_x))
                region = heatmap[b, 0, top:bottom, left:right]
                region.clamp_(min=score)  # max of overlapping boxes' confidences
        return heatmap.clamp(0, 1)
