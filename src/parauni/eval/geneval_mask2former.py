"""GenEval's official detector on Hugging Face models (Ghosh et al. 2023; the paper's main benchmark; the
README.md, "Evaluate").

GenEval detects objects with mmdet's Mask2Former (Swin-S, COCO instances) and names colours with CLIP ViT-L/14
zero-shot on masked crops. Here both run on ``transformers`` models loaded from a local folder or a Hugging
Face id (`facebook/mask2former-swin-small-coco-instance`, `openai/clip-vit-large-patch14`):

* `Mask2FormerDetector`: ``(image, filename=None) -> list[ImageDetection]``, the detector of
  `parauni.eval.geneval.score_geneval` and of the RL `GenEvalReward`. Preprocessing and post-processing follow
  mmdet rather than the Hugging Face image processor (whose default for that repo is a 384 px short side):
  keep-ratio resize to 1333x800 (`keep_ratio_size`), normalisation with the image processor's mean / std,
  zero padding to a multiple of 32, then `mask2former_instances` on the raw outputs.
* `mask2former_instances`: mmdet's Mask2Former instance post-processing as a pure function: top 100 (query,
  class) pairs by class probability (softmax without the no-object class), masks upsampled to the padded
  input, cropped to the resized image and resized to the original size, binary mask = logit > 0, score =
  class probability x mean mask sigmoid inside the binary mask, box = the binary mask's tight box.
* `CLIPColorClassifier`: the `ColorClassifier` of the real GenEval: each object's crop (grey #999 outside
  its mask, cut to its box) against the ten colours' text embeddings, each the normalised mean over GenEval's
  three templates.

COCO's class names become GenEval's object names (`geneval_object_name`): three COCO names differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..scoring.clip import CLIP_L14, CLIPEmbedder, load_reward_weights
from ..scoring.geneval_rules import GENEVAL_COLORS, Detection
from ..utils.device import default_device

MASK2FORMER_REPO = "facebook/mask2former-swin-small-coco-instance"
TEST_SCALE = (1333, 800)  # mmdet's test Resize: long side at most 1333, short side at most 800
SIZE_DIVISOR = 32  # mmdet pads the resized image to a multiple of 32
TOP_K = 100  # mmdet's max_per_image
CROP_BACKGROUND = (153, 153, 153)  # GenEval's bgcolor "#999"
COLOR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")

# GenEval's object_names.txt: the 80 COCO classes in COCO order, in GenEval's spelling.
GENEVAL_OBJECTS: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
# The COCO names (mmdet's CocoDataset, the Hugging Face COCO configs' id2label) that GenEval spells otherwise.
COCO_TO_GENEVAL = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}


def geneval_object_name(coco_name: str) -> str:
    """A COCO class name as GenEval's object name ("mouse" -> "computer mouse"); ValueError if neither."""
    name = COCO_TO_GENEVAL.get(coco_name, coco_name)
    if name not in GENEVAL_OBJECTS:
        raise ValueError(
            f"detector class {coco_name!r} is not a GenEval object name nor a COCO name of one; GenEval "
            f"needs a COCO-instance detector (e.g. {MASK2FORMER_REPO}) whose id2label names the 80 COCO "
            "classes"
        )
    return name


@dataclass
class ImageDetection(Detection):
    """A `Detection` that keeps a reference to its uint8 (H, W, 3) source image, for colour classification."""

    image: np.ndarray | None = None


@dataclass
class Instances:
    """One image's instance predictions: N = min(top_k, Q * K) (query, class) pairs, best score first.

    labels (N,) class indices; scores (N,); boxes (N, 4) as (x0, y0, x1, y1) pixels with exclusive x1, y1
    (all zeros for an empty mask); masks (N, H, W) bool at the original image size.
    """

    labels: torch.Tensor
    scores: torch.Tensor
    boxes: torch.Tensor
    masks: torch.Tensor


# --------------------------------------------------------------------------------------- pure functions


def keep_ratio_size(height: int, width: int, scale: tuple[int, int] = TEST_SCALE) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest (h, w) with the image's aspect ratio whose long side is at most
    max(scale) and short side at most min(scale), rounded half up (512x512 -> 800x800, 480x640 ->
    800x1067)."""
    if height < 1 or width < 1:
        raise ValueError(f"cannot resize an image of {height} x {width} pixels")
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Bool masks (N, H, W) -> tight boxes (N, 4) float (x0, y0, x1 + 1, y1 + 1); empty masks give zeros."""
    n, height, width = masks.shape
    cols, rows = masks.any(dim=1), masks.any(dim=2)  # (N, W), (N, H)
    xs = torch.arange(width, device=masks.device).expand(n, width)
    ys = torch.arange(height, device=masks.device).expand(n, height)
    x0 = torch.where(cols, xs, width).amin(1)
    x1 = torch.where(cols, xs, -1).amax(1) + 1
    y0 = torch.where(rows, ys, height).amin(1)
    y1 = torch.where(rows, ys, -1).amax(1) + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    return torch.where(cols.any(1, keepdim=True), boxes, torch.zeros_like(boxes))


def mask2former_instances(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    input_size: tuple[int, int],
    resized_sizes: list[tuple[int, int]],
    image_sizes: list[tuple[int, int]],
    top_k: int = TOP_K,
) -> list[Instances]:
    """mmdet's Mask2Former instance post-processing of a batch of raw model outputs.

    class_logits (B, Q, K + 1), the last class being "no object"; mask_logits (B, Q, h, w) at 1/4 of the
    padded model input of `input_size` (H_in, W_in); image b was resized to resized_sizes[b] (its top-left
    part of the input) from image_sizes[b], the size its masks are returned at. Per image:

    1. p = softmax(class_logits)[:, :K]; the top_k (query, class) pairs by p (a query may appear with
       several classes);
    2. each chosen query's mask logits bilinearly upsampled to the input size, cropped to the resized image
       and resized to the original image (align_corners=False both times);
    3. mask = logit > 0; score = p x the mean sigmoid over the mask (0 for an empty mask); box = tight box.
    """
    if class_logits.dim() != 3 or mask_logits.dim() != 4 or class_logits.shape[:2] != mask_logits.shape[:2]:
        raise ValueError(
            f"expected class logits (B, Q, K + 1) and mask logits (B, Q, h, w) of the same B and Q, got "
            f"{tuple(class_logits.shape)} and {tuple(mask_logits.shape)}"
        )
    batch = class_logits.shape[0]
    if len(resized_sizes) != batch or len(image_sizes) != batch:
        raise ValueError(
            f"{batch} images of outputs but {len(resized_sizes)} resized sizes and {len(image_sizes)} "
            "image sizes"
        )
    if top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    results = []
    for b in range(batch):
        probs = class_logits[b].float().softmax(-1)[:, :-1]  # (Q, K)
        num_classes = probs.shape[1]
        class_scores, flat = probs.flatten().topk(min(top_k, probs.numel()))  # (N,)
        queries, labels = flat // num_classes, flat % num_classes
        # Only the chosen queries' masks are resized (interpolation is per mask, so this changes nothing).
        used, inverse = queries.unique(return_inverse=True)  # (U,), (N,)
        logits = F.interpolate(
            mask_logits[b, used][None].float(), size=input_size, mode="bilinear", align_corners=False
        )
        height, width = resized_sizes[b]
        logits = F.interpolate(
            logits[..., :height, :width], size=image_sizes[b], mode="bilinear", align_corners=False
        )[0]
        binary = logits > 0  # (U, H, W)
        area = binary.flatten(1).sum(1)
        mask_scores = (logits.sigmoid() * binary).flatten(1).sum(1) / (area + 1e-6)  # (U,)
        scores = class_scores * mask_scores[inverse]
        order = scores.argsort(descending=True)
        masks = binary[inverse[order]]  # (N, H, W)
        results.append(Instances(labels[order], scores[order], masks_to_boxes(masks), masks))
    return results


# -------------------------------------------------------------------------------------------- detector


class Mask2FormerDetector:
    """A ``Mask2FormerForUniversalSegmentation`` COCO-instance model as GenEval's detector.

    ``detector(image, filename=None)`` takes a uint8 (H, W, 3) RGB image and returns its top-k instances as
    `ImageDetection`s named with GenEval's object names, each holding its bool (H, W) mask, tight box and a
    reference to the image (for `CLIPColorClassifier`). GenEval's score thresholds apply later
    (`parauni.scoring.geneval_rules.filter_detections`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        image_mean: tuple[float, float, float],
        image_std: tuple[float, float, float],
        rescale_factor: float = 1 / 255,
        scale: tuple[int, int] = TEST_SCALE,
        size_divisor: int = SIZE_DIVISOR,
        top_k: int = TOP_K,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        id2label = model.config.id2label
        self.labels = [geneval_object_name(id2label[i]) for i in range(len(id2label))]
        self.mean = torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.rescale_factor = float(rescale_factor)
        self.scale = scale
        self.size_divisor = size_divisor
        self.top_k = top_k

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path = MASK2FORMER_REPO,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        **kwargs,
    ) -> Mask2FormerDetector:
        """Load the model and its image processor's normalisation from a local folder or a Hugging Face id,
        onto `device` (default: CUDA when available, else CPU); `kwargs` go to the constructor."""
        from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessorPil

        what = "GenEval detector (Mask2Former)"
        model = load_reward_weights(
            Mask2FormerForUniversalSegmentation.from_pretrained, source, what, MASK2FORMER_REPO, dtype=dtype
        )
        processor = load_reward_weights(
            Mask2FormerImageProcessorPil.from_pretrained, source, f"{what} image processor", MASK2FORMER_REPO
        )
        device = device or default_device()
        rescale = processor.rescale_factor if processor.do_rescale else 1.0
        mean, std = (
            (processor.image_mean, processor.image_std)
            if processor.do_normalize
            else ((0.0,) * 3, (1.0,) * 3)
        )
        return cls(model.to(device), tuple(mean), tuple(std), rescale, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """uint8 (H, W, 3) -> (pixel values (1, 3, H_in, W_in) on the model's device, resized (h, w)).

        Bilinear resize without antialiasing, rounded back to uint8 levels (mmcv's cv2 resize of the uint8
        image), normalised, then zero padded at the bottom and right to a multiple of `size_divisor`.
        """
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"the detector takes a uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}"
            )
        size = keep_ratio_size(image.shape[0], image.shape[1], self.scale)
        x = torch.tensor(image, device=self.device).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)  # (1, 3, h, w)
        x = x.round().clamp(0, 255)
        x = (x * self.rescale_factor - self.mean.to(x.device)) / self.std.to(x.device)
        d = self.size_divisor
        x = F.pad(x, (0, -size[1] % d, 0, -size[0] % d))  # (1, 3, H_in, W_in)
        return x.to(self.model.dtype), size

    @torch.no_grad()
    def __call__(self, image: np.ndarray, filename: str | None = None) -> list[ImageDetection]:
        """uint8 (H, W, 3) -> detections; `filename` is unused (the `Detector` interface of geneval.py)."""
        pixels, resized = self.preprocess(image)
        out = self.model(pixel_values=pixels)
        if out.class_queries_logits.shape[-1] != len(self.labels) + 1:
            raise ValueError(
                f"the model predicts {out.class_queries_logits.shape[-1] - 1} classes but its id2label names "
                f"{len(self.labels)}; fix the model's config.json"
            )
        (inst,) = mask2former_instances(
            out.class_queries_logits,
            out.masks_queries_logits,
            tuple(pixels.shape[-2:]),
            [resized],
            [image.shape[:2]],
            self.top_k,
        )
        masks = inst.masks.cpu().numpy()  # (N, H, W) bool
        return [
            ImageDetection(self.labels[label], score, tuple(box), masks[i], image=image)
            for i, (label, score, box) in enumerate(
                zip(inst.labels.tolist(), inst.scores.tolist(), inst.boxes.tolist(), strict=True)
            )
        ]


# ------------------------------------------------------------------------------------ colour classifier


class CLIPColorClassifier:
    """GenEval's colour classifier: CLIP zero-shot over `colors` on each object's masked crop.

    ``classifier(detections, cls) -> colours`` (the `ColorClassifier` interface) for `ImageDetection`s: the
    source image with `background` outside the mask, cropped to the box rounded to whole pixels (as PIL's
    crop), embedded by `CLIPEmbedder` (its processor's resize / crop / normalisation), against per-colour
    text embeddings: the L2-normalised mean of the normalised embeddings of `templates` with ``{c}`` the
    colour and ``{cls}`` the class (computed once per class).
    """

    def __init__(
        self,
        embedder: CLIPEmbedder,
        colors: tuple[str, ...] = GENEVAL_COLORS,
        templates: tuple[str, ...] = COLOR_TEMPLATES,
        background: tuple[int, int, int] = CROP_BACKGROUND,
    ) -> None:
        self.embedder = embedder
        self.colors = colors
        self.templates = templates
        self.background = np.asarray(background, dtype=np.uint8)
        self._text: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(
        cls, source: str | Path = CLIP_L14, *, device: str | torch.device | None = None
    ) -> CLIPColorClassifier:
        """CLIP (model, tokenizer, image processor) from a local folder or a Hugging Face id, onto `device`
        (default: CUDA when available, else CPU)."""
        embedder = CLIPEmbedder.from_pretrained(source, what="GenEval colour classifier (CLIP ViT-L/14)")
        return cls(embedder.to(device or default_device()))

    def text_classifier(self, cls: str) -> torch.Tensor:
        """The colours' text embeddings for class `cls`: (len(colors), D), L2-normalised."""
        if cls not in self._text:
            prompts = [t.format(c=c, cls=cls) for c in self.colors for t in self.templates]
            embeds = self.embedder.embed_texts(prompts).view(len(self.colors), len(self.templates), -1)
            self._text[cls] = F.normalize(embeds.mean(1), dim=-1)
        return self._text[cls]

    def crop(self, det: Detection) -> np.ndarray:
        """The object's uint8 (h, w, 3) crop: its image with the background colour outside its mask, cut to
        its box (rounded, clipped to the image)."""
        image = getattr(det, "image", None)
        if image is None or det.mask is None:
            raise ValueError(
                f"detection of {det.label!r} with box {det.box} has no source image or mask; CLIP colour "
                "classification needs the ImageDetections of an image detector such as Mask2FormerDetector"
            )
        height, width = image.shape[:2]
        composite = np.where(det.mask[..., None], image, self.background)  # (H, W, 3)
        x0, y0, x1, y1 = (round(v) for v in det.box)
        x0, x1 = max(0, x0), min(width, x1)
        y0, y1 = max(0, y0), min(height, y1)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"detection of {det.label!r} has the empty box {det.box}; nothing to classify")
        return composite[y0:y1, x0:x1]

    @torch.no_grad()
    def __call__(self, dets: list[Detection], cls: str) -> list[str]:
        """The colour of each of `dets` (ImageDetections of class `cls`), one of `colors` each."""
        if not dets:
            return []
        text = self.text_classifier(cls)  # (C, D)
        # One crop at a time: crops differ in size and the embedder resizes each to the CLIP input.
        images = [torch.from_numpy(self.crop(d)).permute(2, 0, 1)[None].float() / 127.5 - 1 for d in dets]
        embeds = torch.cat([self.embedder.embed_images(x) for x in images])  # (N, D)
        return [self.colors[i] for i in (embeds @ text.T).argmax(1).tolist()]
