"""ShapesEval's detector: finds the shapes world's objects in an image and returns them as `Detection`s.

It plays the part of GenEval's Mask2Former + CLIP colour classifier for the shapes world, so that
ShapesEval = `filter_detections` + `evaluate_image` + `score_rows` from `parauni.scoring.geneval_rules`,
unchanged. Steps, on a (possibly imperfect, generated) uint8 image:

1. Colour-cast correction: if the border's median colour is near the world's grey, shift the image so it
   is exactly grey (undoes a global colour shift).
2. Per pixel, the nearest of the background and the ten palette colours; foreground = not background.
3. Connected components of the foreground (4-connectivity); components below a minimum area (scaled with
   the image size) are noise.
4. A component holding two or more palette colours, each with a solid core, is split into per-colour parts
   (shapes of different colours that touch). Pixels are assigned to colours by their distance to the grey
   -> colour segment, so the blurred rim of a red shape counts as red, not brown.
5. Per part: colour = palette entry nearest to the part's median RGB; class = the shape whose template,
   rendered at the box that matches the part's area and centroid, has the best IoU with the part's mask;
   score = a logistic curve of that IoU times a colour-purity factor: > 0.99 for clean renders, lower for
   ragged or blurred blobs, near 0 for noise.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage

from ..eval.geneval import Detector as GenEvalDetector
from ..eval.geneval import DetectorChoice
from ..scoring.geneval_rules import ColorClassifier, Detection, color_from_detection
from .scene import BACKGROUND, COLORS, SHAPES, shape_mask

_PALETTE = np.array(list(COLORS.values()), dtype=float)  # (10, 3)
_COLOR_NAMES = tuple(COLORS)
_BACKGROUND = np.array(BACKGROUND, dtype=float)
_CROP_PAD = 2


def _segment_distances(pixels: np.ndarray) -> np.ndarray:
    """Distance of each pixel (N, 3) to each background -> palette-colour segment -> (N, 10).

    A blend t * colour + (1 - t) * grey (a blurred or anti-aliased rim) lies on that colour's segment.
    """
    direction = _PALETTE - _BACKGROUND  # (10, 3)
    rel = pixels - _BACKGROUND  # (N, 3)
    along = rel @ direction.T  # (N, 10)
    length2 = (direction**2).sum(-1)  # (10,)
    t = np.clip(along / length2, 0.0, 1.0)
    # |rel - t * direction|^2 expanded, to avoid an (N, 10, 3) temporary.
    dist2 = (rel**2).sum(-1, keepdims=True) - 2 * t * along + t**2 * length2
    return np.sqrt(np.maximum(dist2, 0.0))


@lru_cache(maxsize=len(SHAPES))
def _shape_stats(shape: str) -> tuple[float, float, float]:
    """(area, centroid x, centroid y) of `shape` rendered in a unit box, the centroid relative to the box
    centre; measured from a fine rasterisation so it follows the renderer's definitions."""
    n = 128
    mask = shape_mask(shape, (0.0, 0.0, float(n), float(n)), n, n)
    ys, xs = np.nonzero(mask)
    return float(mask.mean()), float((xs.mean() + 0.5) / n - 0.5), float((ys.mean() + 0.5) / n - 0.5)


def _fitted_template(shape: str, crop: np.ndarray) -> np.ndarray:
    """`shape` rendered on the crop's canvas at the box that matches the crop's area and centroid.

    Fitting a continuous box (rather than stretching the template over the tight pixel box) matters for
    small objects, whose pixel boxes are off by up to a pixel from the true box.
    """
    area, off_x, off_y = _shape_stats(shape)
    ys, xs = np.nonzero(crop)
    side = float(np.sqrt(len(xs) / area))
    cx, cy = xs.mean() + 0.5 - off_x * side, ys.mean() + 0.5 - off_y * side
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    return shape_mask(shape, box, *crop.shape)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


class ShapesDetector:
    """Detects circles, squares, triangles and crosses of the ten palette colours on the grey background.

    Args:
        min_area_frac: components smaller than this fraction of the image area are noise (the world's
            smallest objects cover about 2% of the image).
        max_cast: largest global colour shift (RGB distance of the border's median from grey) to correct;
            beyond it the image is taken as is.
        iou_mid, iou_scale: the logistic curve mapping the best template IoU to a confidence (clean renders
            reach IoU 0.9-1.0, confidence > 0.99; at IoU 0.72 it is 0.91, at 0.6 it is 0.16).
        purity_floor: colour purity (fraction of pixels whose nearest colour segment is the detection's
            colour) at which the purity factor reaches 0; it is 1 at purity 1.
    """

    def __init__(
        self,
        min_area_frac: float = 0.01,
        max_cast: float = 45.0,
        iou_mid: float = 0.65,
        iou_scale: float = 0.03,
        purity_floor: float = 0.5,
    ) -> None:
        self.min_area_frac = min_area_frac
        self.max_cast = max_cast
        self.iou_mid = iou_mid
        self.iou_scale = iou_scale
        self.purity_floor = purity_floor

    def __call__(self, image: np.ndarray) -> list[Detection]:
        """Detect objects in a uint8 (H, W, 3) image."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"ShapesDetector needs a uint8 (H, W, 3) image, got {image.dtype} {image.shape}; "
                "convert with np.asarray(PIL_image.convert('RGB'))"
            )
        pixels = self._cast_corrected(image.astype(float))  # (H, W, 3)
        height, width = pixels.shape[:2]
        min_area = max(1, round(self.min_area_frac * height * width))
        refs = np.concatenate([_BACKGROUND[None], _PALETTE])  # (11, 3): background first
        foreground = np.linalg.norm(pixels[:, :, None, :] - refs, axis=-1).argmin(-1) > 0  # (H, W)
        segment = _segment_distances(pixels.reshape(-1, 3)).reshape(height, width, -1)  # (H, W, 10)
        components, _ = ndimage.label(foreground)
        detections = []
        for index, window in enumerate(ndimage.find_objects(components), start=1):
            component = components[window] == index
            if component.sum() < min_area:
                continue
            for part in _split_by_color(component, segment[window], min_area):
                mask = np.zeros((height, width), dtype=bool)
                mask[window] = part
                detections.append(self._describe(mask, pixels, segment))
        return detections

    def classify_colors(self, dets: list[Detection], cls: str) -> list[str]:
        """GenEval's colour classification for this detector: each detection's own colour."""
        return color_from_detection(dets, cls)

    def _cast_corrected(self, pixels: np.ndarray) -> np.ndarray:
        border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])  # (P, 3)
        cast = np.median(border, axis=0) - _BACKGROUND
        if np.linalg.norm(cast) > self.max_cast:
            return pixels
        return pixels - cast

    def _describe(self, mask: np.ndarray, pixels: np.ndarray, segment: np.ndarray) -> Detection:
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        color_index = int(np.linalg.norm(_PALETTE - np.median(pixels[mask], axis=0), axis=-1).argmin())
        purity = float((segment[mask].argmin(-1) == color_index).mean())
        # Pad the crop so that a fitted template may reach past the tight pixel box.
        crop = np.pad(mask[y0:y1, x0:x1], _CROP_PAD)
        ious = [_iou(crop, _fitted_template(shape, crop)) for shape in SHAPES]
        best = int(np.argmax(ious))
        confidence = 1.0 / (1.0 + np.exp(-(ious[best] - self.iou_mid) / self.iou_scale))
        purity_factor = np.clip((purity - self.purity_floor) / (1.0 - self.purity_floor), 0.0, 1.0)
        return Detection(
            label=SHAPES[best],
            score=float(confidence * purity_factor),
            box=(float(x0), float(y0), float(x1), float(y1)),
            mask=mask,
            color=_COLOR_NAMES[color_index],
        )


def _split_by_color(component: np.ndarray, segment: np.ndarray, min_area: int) -> list[np.ndarray]:
    """The component as one mask, or one mask per connected single-colour piece when it holds several
    colours with a solid core each (shapes of different colours that touch).

    A colour has a solid core when it covers at least `min_area` pixels and some survive one erosion;
    this ignores scattered noise pixels. `segment` is (h, w, 10) distances to the colour segments.
    """
    labels = np.where(component, segment.argmin(-1), -1)  # (h, w); -1 outside the component
    cores = [
        c
        for c in np.unique(labels[component])
        if (labels == c).sum() >= min_area and ndimage.binary_erosion(labels == c).any()
    ]
    if len(cores) < 2:
        return [component]
    # Give every pixel of the component to the nearest of the core colours, then split into pieces.
    labels[component] = np.asarray(cores)[segment[component][:, cores].argmin(-1)]
    parts = []
    for c in cores:
        pieces, n = ndimage.label(labels == c)
        parts += [pieces == i for i in range(1, n + 1) if (pieces == i).sum() >= min_area]
    return parts


def world_classes() -> tuple[str, ...]:
    """The object classes the shapes world's detector finds."""
    return SHAPES


def world_detector() -> tuple[GenEvalDetector, ColorClassifier]:
    """The shapes world's `ShapesDetector` as a GenEval (detector, classify_colors) pair."""
    shapes = ShapesDetector()
    return (lambda image, filename: shapes(image)), shapes.classify_colors


def world_detector_choice() -> DetectorChoice:
    """``--detector world`` of the GenEval commands (:func:`parauni.eval.geneval.choose_detector`)."""
    return DetectorChoice(*world_detector(), world_classes())
