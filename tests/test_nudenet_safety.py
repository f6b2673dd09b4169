"""NudeNetSafety against nudenet itself (onnxruntime) on scikit-image's bundled photos; skipped without the extra.

No explicit photo ships with any package here, so the box / heatmap / mask path is tested on a real
detection of a *non-exposed* class (NudeNet's FACE_FEMALE on the astronaut photo) via ``classes``.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

nudenet = pytest.importorskip("nudenet")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx2torch")
skimage_data = pytest.importorskip("skimage.data")

from nudenet.nudenet import _read_image  # noqa: E402

from fnf.masks import MaskArgs, heatmap_to_mask  # noqa: E402
from fnf.rewards.base import check_reward_output  # noqa: E402
from fnf.rewards.nudenet_safety import EXPOSED, SEXUAL, NudeNetSafety  # noqa: E402
from fnf.rewards.saliency import Saliency  # noqa: E402

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field"]
FACES = ["FACE_FEMALE", "FACE_MALE"]


@pytest.fixture(scope="module")
def photos() -> dict[str, tuple]:
    """name -> (RGB uint8 array, (1, 3, H, W) RGB tensor in [0, 1])."""
    arrays = {name: getattr(skimage_data, name)() for name in PHOTOS}  # bundled in the wheel: no download
    return {name: (a, torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255) for name, a in arrays.items()}


@pytest.fixture(scope="module")
def detector():
    return nudenet.NudeDetector()  # onnxruntime on the same 320n.onnx


@pytest.fixture(scope="module")
def head() -> NudeNetSafety:
    return NudeNetSafety()


def test_labels_are_nudenets():
    assert NudeNetSafety(classes=FACES).labels == list(getattr(nudenet.nudenet, "__labels"))
    assert all(name.endswith("_EXPOSED") for name in EXPOSED) and len(EXPOSED) == 9
    assert set(SEXUAL) < set(EXPOSED) and NudeNetSafety().classes == list(SEXUAL)


@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence")  # onnx2torch's Slice, see NudeNetSafety.raw
@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee"])
def test_torch_module_matches_onnxruntime(detector, photos, name):
    """Same input blob (nudenet's own preprocessing of the photo read as a file, BGR): max |diff| measured
    6.4e-4 on box coordinates (0..320 px) and 2.0e-6 on confidences; tolerance 5e-3 px and 1e-4."""
    head = NudeNetSafety(antialias=False)  # nudenet's own resize
    array, images = photos[name]
    blob = _read_image(array[..., ::-1].copy(), 320)[0]  # what NudeDetector.detect(path) feeds
    expected = torch.from_numpy(detector.onnx_session.run(None, {"images": blob})[0])
    with torch.no_grad():
        actual = head.detector(torch.from_numpy(blob))
    torch.testing.assert_close(actual[:, :4], expected[:, :4], rtol=0, atol=5e-3)
    torch.testing.assert_close(actual[:, 4:], expected[:, 4:], rtol=0, atol=1e-4)
    # Our differentiable letterbox (float, F.interpolate) vs nudenet's (uint8, cv2): < 1/255 per pixel
    # (measured 0.76/255), confidences end to end within 0.02 (measured 8.5e-3).
    torch.testing.assert_close(head.letterbox(images), torch.from_numpy(blob), rtol=0, atol=1 / 255)
    with torch.no_grad():
        torch.testing.assert_close(head.raw(images)[:, 4:], expected[:, 4:], rtol=0, atol=0.02)


def test_score_gradient_reaches_every_pixel(head, photos):
    """Also at SDXL's 1024 px: the antialiased downscale spreads each pixel's gradient (nudenet's own bilinear
    resize, antialias false, reads 2×2 pixels per output pixel there: a gradient on under half of them)."""
    images = photos["astronaut"][1].clone().requires_grad_(True)
    out = check_reward_output(head, head(images, ["a photo"]), images)
    assert out.score.shape == (1,) and -1 <= out.score.item() <= 0 and out.score.dtype == torch.float32
    out.score.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    large = torch.nn.functional.interpolate(photos["astronaut"][1], size=(1024, 1024), mode="bilinear")
    for antialias, reached in ((True, lambda share: share == 1.0), (False, lambda share: share < 0.5)):
        pixels = large.clone().requires_grad_(True)
        NudeNetSafety(antialias=antialias)(pixels, [""]).score.sum().backward()
        share = (pixels.grad.abs().sum(1) > 0).float().mean().item()
        assert reached(share), (antialias, share)


@pytest.mark.parametrize("padded", [False, True])
def test_detections_are_nudenets(detector, photos, padded):
    """Each anchor's most confident label, one class-agnostic NMS (nudenet's), then the chosen classes: with every
    label chosen, the head reports what nudenet reports (per-class NMS would add weaker guesses on the same box)."""
    array = photos["astronaut"][0]
    if padded:
        array = np.pad(array, ((0, 200), (0, 0), (0, 0)))
    images = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255
    head = NudeNetSafety(classes=NudeNetSafety(classes=FACES).labels, antialias=False)
    expected = sorted((d["class"], d["score"], d["box"]) for d in detector.detect(array[..., ::-1].copy()))
    found = sorted(head.detect(images)[0])
    assert [label for label, _, _ in found] == [label for label, _, _ in expected] != []
    for (_, score, (x0, y0, x1, y1)), (_, reference, (x, y, w, h)) in zip(found, expected):
        assert abs(score - reference) < 0.02 and max(map(abs, (x0 - x, y0 - y, x1 - x - w, y1 - y - h))) < 3


def test_the_tuned_pass_gets_the_score_without_detections(head, photos, monkeypatch):
    """Under ``scores_only`` (the tuned pass) no heatmap is built: its detections read boxes back to the host per
    image (a device sync each) for a map nobody reads; the score is the same."""
    from fnf.rewards.base import scores_only

    images = photos["astronaut"][1]
    full = head(images, [""])
    monkeypatch.setattr(head, "_heatmap", lambda *args: pytest.fail("a heatmap built in the tuned pass"))
    with scores_only():
        fast = head(images, [""])
    assert fast.heatmap is None and torch.equal(fast.score, full.score)


@pytest.mark.parametrize("name", PHOTOS)
def test_no_exposed_part_on_the_sample_photos(head, detector, photos, name):
    """Neither nudenet nor the head finds an exposed class. Closest call: coffee's BUTTOCKS_EXPOSED at 0.21
    (below nudenet's 0.25; fed RGB instead of nudenet's BGR it reaches 0.30 and would be detected), whose soft
    maximum makes the score -0.058 (-0.029 with nudenet's own resize, antialias false); every other photo's
    is above -0.001."""
    array, images = photos[name]
    assert [d for d in detector.detect(array[..., ::-1].copy()) if d["class"] in EXPOSED] == []
    out = head(images, [""])
    assert out.heatmap.amax() == 0  # an all-zero heatmap: no detection
    assert out.score.item() > (-0.07 if name == "coffee" else -0.001)


def test_heatmap_and_mask_cover_a_real_detection(detector, photos):
    """FACE_FEMALE (not an exposed class: no explicit photo ships) on the astronaut: the head finds
    nudenet's box, paints it with its confidence, and fnf.masks turns it into a mask of that region."""
    array, images = photos["astronaut"]
    faces = [d for d in detector.detect(array[..., ::-1].copy()) if d["class"] == "FACE_FEMALE"]
    assert len(faces) == 1 and faces[0]["score"] > 0.5
    x, y, w, h = faces[0]["box"]
    head = NudeNetSafety(classes=["FACE_FEMALE"], box_padding=0.1, antialias=False)  # nudenet's own resize
    ((label, score, box),) = head.detect(images)[0]
    assert label == "FACE_FEMALE" and abs(score - faces[0]["score"]) < 0.02
    assert max(abs(a - b) for a, b in zip(box, (x, y, x + w, y + h))) < 3  # pixels
    out = check_reward_output(head, head(images, ["an astronaut"]), images)
    heatmap = out.heatmap[0, 0]
    assert (heatmap[y:y + h, x:x + w] == heatmap.amax()).all() and abs(heatmap.amax() - score) < 1e-4
    assert heatmap[:int(y - 0.1 * h) - 2].amax() == 0 and heatmap[:, int(x + 1.1 * w) + 2:].amax() == 0  # + padding
    assert out.score.item() < -0.3  # a confident face lowers the "safety" score
    mask = heatmap_to_mask(out.heatmap, MaskArgs(threshold=0.25, dilation=0))[0, 0]
    assert mask[y:y + h, x:x + w].all() and 0.03 < mask.mean() < 0.06  # the padded face box, ~4 % of the image


@pytest.mark.parametrize("method, layer", [("gradient", None), ("gradcam", "detector.model/18/cv2/act/Mul")])
def test_saliency_of_the_score_points_at_the_detection(photos, method, layer):
    """Saliency of the scalar score (FACE_FEMALE on the astronaut) peaks inside nudenet's face box. Grad-CAM
    at the neck's stride-16 output (where YOLOv8 detects a ~64 px object at 320 px) is of −score: measured
    99 % of its mass in the 4 % of the photo the box covers (of +score, as before: 2 %, peak outside);
    gradient saliency: 22 %."""
    images = photos["astronaut"][1]
    head = NudeNetSafety(classes=["FACE_FEMALE"], box_padding=0.0)
    ((_, _, (x0, y0, x1, y1)),) = head.detect(images)[0]
    box = torch.zeros(images.shape[-2:], dtype=torch.bool)
    box[math.floor(y0):math.ceil(y1), math.floor(x0):math.ceil(x1)] = True  # ~4 % of the photo
    heatmap = Saliency(head, method=method, layer=layer)(images, ["an astronaut"]).heatmap[0, 0]
    assert box.flatten()[heatmap.flatten().argmax()]
    if method == "gradcam":
        assert heatmap[box].sum() > 0.5 * heatmap.sum()


def test_bad_class_and_missing_install_are_one_clear_error(monkeypatch):
    with pytest.raises(ValueError, match=r"NudeNetSafety.classes: unknown class 'BREAST_EXPOSED'; choose from"):
        NudeNetSafety(classes=["BREAST_EXPOSED"])
    with pytest.raises(ValueError, match=r"NudeNetSafety.classes: empty; choose from"):
        NudeNetSafety(classes=[])  # no class at all, not the default
    with pytest.raises(FileNotFoundError, match=r"NudeNetSafety.weights: no such ONNX file /no/640m.onnx"):
        NudeNetSafety(weights="/no/640m.onnx")
    monkeypatch.setitem(sys.modules, "onnx2torch", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install fnf\[nudenet\] \(cannot import 'onnx2torch'\)"):
        NudeNetSafety()


def test_yaml_class_paths_and_import_without_the_extra():
    """Both the full and the short class_path build the head; the default classes are in the config (so a resumed
    run compares them); ``import fnf.rewards`` loads none of the extra."""
    from jsonargparse import ArgumentParser

    from fnf.module import RewardTerm

    parser = ArgumentParser()
    parser.add_argument("--term", type=RewardTerm)
    for path in ("fnf.rewards.nudenet_safety.NudeNetSafety", "NudeNetSafety"):
        config = parser.parse_args(["--term", '{"head": {"class_path": "%s", "init_args": {"classes": '
                                    '["FACE_FEMALE"], "box_padding": 0.2}}, "mask": "heatmap"}' % path])
        term = parser.instantiate_classes(config).term
        assert isinstance(term.head, NudeNetSafety) and term.head.box_padding == 0.2
    default = parser.parse_args(["--term", '{"head": {"class_path": "NudeNetSafety"}, "mask": "heatmap"}'])
    assert list(default.term.head.init_args.classes) == list(SEXUAL)  # written out: a run's recipe holds its classes
    code = ("import sys, fnf.rewards; assert fnf.rewards.NudeNetSafety; "
            "print(sorted({'nudenet', 'onnx', 'onnx2torch', 'onnxruntime', 'cv2'} & set(sys.modules)))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"
