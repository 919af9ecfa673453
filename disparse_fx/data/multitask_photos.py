"""A small real-image multitask dataset built from the photographs inside scikit-image.

Every sample is a random crop (default 64x64, random horizontal flip) of one of the
photographs that ship with scikit-image (:data:`COLOR_PHOTOS`, :data:`GRAY_PHOTOS`;
nothing is downloaded), with per-pixel targets computed as Taskonomy computes its 2-D
tasks, from the clean crop:

==========  ===============================================================  ===========
task        target                                                           shape/dtype
==========  ===============================================================  ===========
edge        Canny edges of the grayscale crop (``skimage.feature.canny``)     1xHxW 0/1
keypoint    Harris corner response, negatives clipped, divided by            1xHxW [0,1]
            ``max(peak, KEYPOINT_FLOOR)``
segment     one of :data:`SEGMENT_CLASSES` per pixel, by fixed thresholds on  HxW long
            hue / saturation / value of the lightly smoothed crop
denoise     the clean crop (the model's input is the noisy crop)             3xHxW
==========  ===============================================================  ===========

``input`` is the clean crop plus Gaussian noise (``noise_sigma``, clipped to [0, 1]);
the noise of sample ``i`` is drawn from a generator seeded with ``(seed, split, i)``,
so it is fixed per sample. Inputs and targets are in [0, 1] (not ImageNet-normalised).

Splits are by source photograph: a photograph's crops all land in one split. Crops
and targets are built once per parameter set and cached on disk (see
:func:`cache_dir`); the cache file name holds a hash of the build parameters, the
dataset :data:`VERSION` and the scikit-image version.

>>> train, val, test = make_splits(cache=False, n_train=8, n_val=4, n_test=4)
>>> sorted(train[0])
['denoise', 'edge', 'input', 'keypoint', 'segment']
>>> set(train.photos) & set(test.photos)
set()
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = [
    "VERSION",
    "COLOR_PHOTOS",
    "GRAY_PHOTOS",
    "SEGMENT_CLASSES",
    "TASKS",
    "TASK_METRICS",
    "MultitaskPhotos",
    "Splits",
    "make_splits",
    "split_photos",
    "load_photo",
    "compute_targets",
    "segment_classes",
    "harris_heatmap",
    "default_task_losses",
    "cache_dir",
]

log = logging.getLogger(__name__)

#: Bump when the way samples are built changes: it invalidates cached builds.
VERSION = 2

#: Colour photographs bundled with scikit-image (loaded by ``skimage.data.<name>``;
#: "motorcycle" is the left view of ``skimage.data.stereo_motorcycle``).
COLOR_PHOTOS: Tuple[str, ...] = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "motorcycle",
)
#: Grayscale photographs bundled with scikit-image, used as 3 equal channels.
GRAY_PHOTOS: Tuple[str, ...] = ("camera", "coins", "moon", "brick", "grass", "gravel", "clock", "page")

#: Class of ``segment``: achromatic pixels (saturation < 0.2 or value < 0.15) by
#: value (thresholds 1/3, 2/3), chromatic ones by hue (:data:`HUE_EDGES`). The same index means the same thing in every photo.
SEGMENT_CLASSES: Tuple[str, ...] = ("dark", "gray", "light", "red_yellow", "green_cyan", "blue_magenta")

#: task -> (head kind, output channels); accepted by :mod:`disparse_fx.zoo` builders.
TASKS: Dict[str, Tuple[str, int]] = {
    "edge": ("dense", 1),
    "keypoint": ("dense", 1),
    "segment": ("dense", len(SEGMENT_CLASSES)),
    "denoise": ("dense", 3),
}
#: task -> metric family of :func:`disparse_fx.data.metrics.evaluate`.
TASK_METRICS: Dict[str, str] = {
    "edge": "binary",
    "keypoint": "regression",
    "segment": "segmentation",
    "denoise": "regression",
}

CANNY_SIGMA = 1.5
HARRIS_SIGMA = 1.5
#: Harris responses are divided by ``max(peak, KEYPOINT_FLOOR)``, so flat crops whose
#: strongest "corner" is negligible get a near-zero heatmap instead of a rescaled one.
KEYPOINT_FLOOR = 0.1
SEGMENT_SMOOTH_SIGMA = 1.0
#: Hue boundaries (fractions of 360 degrees) of the chromatic classes: red_yellow is
#: [330, 75) degrees, green_cyan [75, 195), blue_magenta [195, 330).
HUE_EDGES = (75 / 360, 195 / 360, 330 / 360)
_SPLITS = ("train", "val", "test")


def cache_dir(path: Union[str, os.PathLike, None] = None) -> Path:
    """The cache folder: ``path`` if given, else ``$DISPARSE_FX_CACHE``, else
    ``~/.cache/disparse_fx``."""
    if path is not None:
        return Path(path)
    env = os.environ.get("DISPARSE_FX_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "disparse_fx"


def load_photo(name: str) -> np.ndarray:
    """A bundled scikit-image photograph as float32 RGB in [0, 1], shape (H, W, 3)."""
    import skimage.data
    from skimage.util import img_as_float32

    if name not in COLOR_PHOTOS + GRAY_PHOTOS:
        raise ValueError(f"photo must be one of {COLOR_PHOTOS + GRAY_PHOTOS}, but got {name!r}")
    image = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    image = img_as_float32(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3])


def _resize_short_side(image: np.ndarray, side: int) -> np.ndarray:
    from skimage.transform import resize

    h, w = image.shape[:2]
    scale = side / min(h, w)
    shape = (max(side, round(h * scale)), max(side, round(w * scale)))
    return resize(image, shape, anti_aliasing=scale < 1, preserve_range=True).astype(np.float32).clip(0, 1)


def segment_classes(rgb: np.ndarray, smooth_sigma: float = SEGMENT_SMOOTH_SIGMA) -> np.ndarray:
    """Per-pixel class index into :data:`SEGMENT_CLASSES` of an RGB image in [0, 1].

    >>> red = np.zeros((4, 4, 3)); red[..., 0] = 1
    >>> int(segment_classes(red, 0)[0, 0]), SEGMENT_CLASSES[3]
    (3, 'red_yellow')
    """
    from skimage.color import rgb2hsv
    from skimage.filters import gaussian

    if smooth_sigma > 0:
        rgb = gaussian(rgb, sigma=smooth_sigma, channel_axis=-1, preserve_range=True)
    hsv = rgb2hsv(np.clip(rgb, 0, 1))
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    achromatic = (sat < 0.2) | (val < 0.15)
    gray_class = np.digitize(val, [1 / 3, 2 / 3])  # 0 dark, 1 gray, 2 light
    hue_class = np.where((hue < HUE_EDGES[0]) | (hue >= HUE_EDGES[2]), 3, np.where(hue < HUE_EDGES[1], 4, 5))
    return np.where(achromatic, gray_class, hue_class).astype(np.uint8)


def harris_heatmap(gray: np.ndarray, sigma: float = HARRIS_SIGMA, floor: float = KEYPOINT_FLOOR) -> np.ndarray:
    """Harris corner response of a grayscale image, clipped at 0 and scaled to [0, 1]."""
    from skimage.feature import corner_harris

    # Reflect-pad so that the crop's own border is not seen as a step (skimage pads
    # with zeros, which puts a "corner" at every corner of a bright crop).
    pad = int(np.ceil(4 * sigma)) + 2
    padded = np.pad(gray.astype(np.float64), pad, mode="reflect")
    response = np.clip(corner_harris(padded, sigma=sigma)[pad:-pad, pad:-pad], 0, None)
    return (response / max(float(response.max()), floor)).astype(np.float32)


def compute_targets(clean: np.ndarray) -> Dict[str, np.ndarray]:
    """Targets of one clean RGB crop (H, W, 3) in [0, 1]: ``edge`` (H, W) bool,
    ``keypoint`` (H, W) float32, ``segment`` (H, W) uint8."""
    from skimage.color import rgb2gray
    from skimage.feature import canny

    gray = rgb2gray(clean)
    return {
        "edge": canny(gray, sigma=CANNY_SIGMA, mode="reflect"),
        "keypoint": harris_heatmap(gray),
        "segment": segment_classes(clean),
    }


def split_photos(
    photos: Sequence[str], seed: int = 0, n_val_photos: int = 2, n_test_photos: int = 2
) -> Dict[str, Tuple[str, ...]]:
    """Assign whole photographs to splits, deterministically from ``seed``.

    Colour and grayscale photographs are shuffled separately and interleaved
    (colour first), then the first ``n_test_photos`` go to test, the next
    ``n_val_photos`` to val and the rest to train - so with the defaults test and val
    each get one colour and one grayscale photograph.
    """
    photos = list(dict.fromkeys(photos))
    if n_val_photos < 1 or n_test_photos < 1 or len(photos) < n_val_photos + n_test_photos + 1:
        raise ValueError(
            f"need >= 1 photo per split, but got {len(photos)} photos for {n_val_photos} val and "
            f"{n_test_photos} test photos"
        )
    rng = np.random.default_rng(seed)
    color = [photos[i] for i in rng.permutation(len(photos)) if photos[i] in COLOR_PHOTOS]
    rng = np.random.default_rng(seed + 1)
    gray = [photos[i] for i in rng.permutation(len(photos)) if photos[i] not in COLOR_PHOTOS]
    order = [p for pair in zip(color, gray) for p in pair]
    order += color[len(gray):] + gray[len(color):]
    test, val = order[:n_test_photos], order[n_test_photos : n_test_photos + n_val_photos]
    train = order[n_test_photos + n_val_photos :]
    return {"train": tuple(train), "val": tuple(val), "test": tuple(test)}


def _build_split(
    photos: Dict[str, np.ndarray], names: Sequence[str], n: int, crop: int, rng: np.random.Generator
) -> Dict[str, object]:
    clean = np.empty((n, 3, crop, crop), np.uint8)
    edge = np.empty((n, 1, crop, crop), bool)
    keypoint = np.empty((n, 1, crop, crop), np.float32)
    segment = np.empty((n, crop, crop), np.uint8)
    sources: List[str] = []
    for i in range(n):
        name = names[i % len(names)]
        image = photos[name]
        y = int(rng.integers(0, image.shape[0] - crop + 1))
        x = int(rng.integers(0, image.shape[1] - crop + 1))
        patch = image[y : y + crop, x : x + crop]
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        # Quantise to 8 bits first: the cached crop is uint8 and the targets must be
        # computed from exactly the image the model will see (before noise).
        patch8 = np.round(patch * 255).astype(np.uint8)
        targets = compute_targets(patch8.astype(np.float32) / 255)
        clean[i] = patch8.transpose(2, 0, 1)
        edge[i, 0] = targets["edge"]
        keypoint[i, 0] = targets["keypoint"]
        segment[i] = targets["segment"]
        sources.append(name)
    return {
        "clean": torch.from_numpy(clean),
        "edge": torch.from_numpy(edge),
        "keypoint": torch.from_numpy(keypoint),
        "segment": torch.from_numpy(segment),
        "sources": sources,
    }


class MultitaskPhotos(Dataset):
    """One split of the photo dataset; ``self[i]`` is a dict of tensors:
    ``input`` (3, H, W) float noisy crop, ``edge`` (1, H, W) float 0/1, ``keypoint``
    (1, H, W) float, ``segment`` (H, W) long, ``denoise`` (3, H, W) float clean crop.

    ``sources[i]`` names the photograph of sample ``i``; ``photos`` the split's
    photographs. Works with ``DataLoader``'s default collate.
    """

    def __init__(self, arrays: Mapping[str, object], split: str, photos: Sequence[str], noise_sigma: float, seed: int):
        self.split = split
        self.photos = tuple(photos)
        self.noise_sigma = float(noise_sigma)
        self.seed = int(seed)
        self._clean = arrays["clean"]
        self._edge = arrays["edge"]
        self._keypoint = arrays["keypoint"]
        self._segment = arrays["segment"]
        self.sources: List[str] = list(arrays["sources"])

    @classmethod
    def from_images(
        cls,
        images: Mapping[str, np.ndarray],
        n: int,
        *,
        crop: int = 64,
        seed: int = 0,
        noise_sigma: float = 0.1,
        split: str = "train",
    ) -> "MultitaskPhotos":
        """A split built from your own RGB float images in [0, 1] (name -> (H, W, 3)),
        crops and targets as for the built-in photographs; nothing is cached."""
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, but got {split!r}")
        for name, image in images.items():
            if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < crop:
                raise ValueError(f"image {name!r} must be (H, W, 3) with H, W >= {crop}, but got {image.shape}")
        arrays = _build_split(
            {k: np.asarray(v, np.float32) for k, v in images.items()}, list(images), n, crop,
            np.random.default_rng([seed, _SPLITS.index(split)]),
        )
        return cls(arrays, split, tuple(images), noise_sigma, seed)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index = index % len(self)
        clean = self._clean[index].float() / 255
        generator = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + _SPLITS.index(self.split) * 100_003 + index) % (2**63)
        )
        noise = torch.randn(clean.shape, generator=generator) * self.noise_sigma
        return {
            "input": (clean + noise).clamp_(0, 1),
            "edge": self._edge[index].float(),
            "keypoint": self._keypoint[index].clone(),
            "segment": self._segment[index].long(),
            "denoise": clean,
        }

    def __repr__(self) -> str:
        return f"MultitaskPhotos(split={self.split!r}, n={len(self)}, photos={self.photos})"


class Splits(NamedTuple):
    train: MultitaskPhotos
    val: MultitaskPhotos
    test: MultitaskPhotos


def make_splits(
    *,
    seed: int = 0,
    crop: int = 64,
    photo_side: int = 128,
    n_train: int = 256,
    n_val: int = 64,
    n_test: int = 64,
    noise_sigma: float = 0.1,
    photos: Optional[Sequence[str]] = None,
    n_val_photos: int = 2,
    n_test_photos: int = 2,
    cache: bool = True,
    cache_path: Union[str, os.PathLike, None] = None,
) -> Splits:
    """Build (or load from the cache) the train / val / test splits.

    Args:
        seed: decides the photo split, the crops, the flips and the noise.
        crop: side of the square crops.
        photo_side: photographs are first resized so their short side is this.
        n_train, n_val, n_test: crops per split (spread evenly over its photographs).
        noise_sigma: std of the Gaussian noise of ``input``.
        photos: which photographs (default: :data:`COLOR_PHOTOS` + :data:`GRAY_PHOTOS`).
        n_val_photos, n_test_photos: photographs held out for val and test.
        cache: read and write the cache file; ``cache_path``: its folder
            (default :func:`cache_dir`).
    """
    import skimage

    if crop < 8 or photo_side < crop:
        raise ValueError(f"need 8 <= crop <= photo_side, but got crop={crop}, photo_side={photo_side}")
    if min(n_train, n_val, n_test) < 1:
        raise ValueError(f"every split needs >= 1 sample, but got {n_train}, {n_val}, {n_test}")
    if not 0 <= noise_sigma:
        raise ValueError(f"noise_sigma must be >= 0, but got {noise_sigma}")
    photos = tuple(photos) if photos is not None else COLOR_PHOTOS + GRAY_PHOTOS
    assignment = split_photos(photos, seed, n_val_photos, n_test_photos)
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    params = dict(
        version=VERSION, skimage=skimage.__version__, seed=seed, crop=crop, photo_side=photo_side,
        sizes=sizes, splits=assignment,
    )
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir(cache_path) / f"multitask_photos-v{VERSION}-{key}.pt"

    arrays = None
    if cache and path.exists():
        try:
            arrays = torch.load(path, weights_only=True)
            log.info("loaded multitask photos from %s", path)
        except Exception as exc:  # a corrupt cache file is rebuilt, not fatal
            log.warning("ignoring unreadable cache file %s: %s", path, exc)
    if arrays is None:
        start = time.perf_counter()
        images = {name: _resize_short_side(load_photo(name), photo_side) for name in photos}
        arrays = {
            split: _build_split(images, assignment[split], sizes[split], crop, np.random.default_rng([seed, i]))
            for i, split in enumerate(_SPLITS)
        }
        log.info("built multitask photos in %.1f s", time.perf_counter() - start)
        if cache:
            _save_atomic(arrays, path)
    return Splits(*(MultitaskPhotos(arrays[s], s, assignment[s], noise_sigma, seed) for s in _SPLITS))


def _save_atomic(obj: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
        log.info("cached multitask photos at %s", path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: Edge pixels are about 12% of the training crops; weighting positives by the
#: negative/positive ratio (class-balanced BCE, as in HED) keeps the edge head from
#: collapsing to "no edge anywhere" (F1 = 0).
EDGE_POS_WEIGHT = 7.0


def _edge_loss(pred: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    pos_weight = torch.tensor(EDGE_POS_WEIGHT, device=pred.device, dtype=pred.dtype)
    return F.binary_cross_entropy_with_logits(pred, batch["edge"], pos_weight=pos_weight)


def _keypoint_loss(pred: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return F.l1_loss(pred, batch["keypoint"])


def _segment_loss(pred: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(pred, batch["segment"])


def _denoise_loss(pred: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return F.l1_loss(pred, batch["denoise"])


def default_task_losses() -> Dict[str, Callable[[torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]]:
    """task -> ``loss(pred, batch)``: class-balanced BCE-with-logits (edge), L1 (keypoint, as the
    paper's Taskonomy setup), cross-entropy (segment), L1 (denoise)."""
    return {"edge": _edge_loss, "keypoint": _keypoint_loss, "segment": _segment_loss, "denoise": _denoise_loss}
