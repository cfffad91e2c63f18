"""``photos``: real photos that ship with scikit-image (offline), as seeded random resized crops.

The split is **by photo** (:func:`photo_split`): 2 of every 7 photos (2 of the 7 colour ones, 2 of the 7
gray ones, chosen by a permutation seeded by ``seed``) are held out for evaluation; calibration and
training crop the other 10. Item ``i`` of a part is a crop of photo ``i % n`` of that part's photos; its box
(``RandomResizedCrop`` parameters, scale (0.25, 1), ratio (3/4, 4/3)) and a horizontal flip are drawn from a
generator seeded by (seed, part, i), so every item is deterministic, computed only when asked for, and the
parts are independent draws.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from normswap.data.base import DataSplit, LazyDataset, item_generator
from normswap.data.preprocess import Preprocess, resize, to_channels
from normswap.errors import NormswapError

# Natural photographs only (no masks, drawings, phantoms or synthetic patterns); gray ones become RGB.
PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
               "camera", "coins", "moon", "clock", "brick", "grass", "gravel")
HELD_OUT = 2 / 7  # of each group (colour / gray photos), rounded
SCALE = (0.25, 1.0)
RATIO = (3 / 4, 4 / 3)


@functools.lru_cache(maxsize=1)
def load_photos() -> tuple[tuple[str, torch.Tensor], ...]:
    """The photos that load here, as (name, uint8 (3, H, W) RGB) pairs; a photo that needs a download is skipped."""
    try:
        import skimage.data as skdata
    except ImportError:
        raise NormswapError("the 'photos' data needs scikit-image: pip install normswap[data] "
                            "(or pass another data spec)") from None
    photos = []
    for name in PHOTO_NAMES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = np.asarray(getattr(skdata, name)())
        except Exception:  # noqa: BLE001 - an entry that needs pooch / a download is simply not part of the set
            continue
        if img.dtype != np.uint8 or img.ndim not in (2, 3):
            continue
        img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
        # (3, H, W) view of an (H, W, 3) array: channels-last, the fast layout for uint8 antialiased resizing
        photos.append((name, torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)))
    if not photos:
        raise NormswapError("none of scikit-image's photos load on this machine: reinstall scikit-image "
                            "(pip install normswap[data]) or pass another data spec")
    return tuple(photos)


def crop_box(height: int, width: int, g: torch.Generator) -> tuple[int, int, int, int]:
    """``RandomResizedCrop.get_params`` (scale (0.25, 1), ratio (3/4, 4/3)) drawn from ``g``: top, left, h, w.

    >>> crop_box(100, 200, torch.Generator().manual_seed(0))
    (12, 15, 88, 72)
    """
    area = height * width
    lo, hi = math.log(RATIO[0]), math.log(RATIO[1])
    for _ in range(10):
        target = area * (SCALE[0] + (SCALE[1] - SCALE[0]) * torch.rand(1, generator=g).item())
        aspect = math.exp(lo + (hi - lo) * torch.rand(1, generator=g).item())
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=g).item())
            return top, left, h, w
    ratio = width / height
    if ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif ratio > RATIO[1]:
        h, w = height, int(round(height * RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def photo_split(seed: int) -> tuple[list[int], list[int]]:
    """(seen, held out): indices into :func:`load_photos`. Per group (colour photos, gray photos) a permutation
    seeded by (seed, group) holds out its first ``round(2/7 * group size)``; the rest are seen (calibration
    and training). With the 14 photos: 10 seen, 4 held out (2 colour, 2 gray).

    >>> seen, held = photo_split(0)
    >>> len(seen), len(held), sorted(set(seen) & set(held))
    (10, 4, [])
    """
    photos = load_photos()
    groups: dict[str, list[int]] = {"colour": [], "gray": []}
    for k, (_, img) in enumerate(photos):
        gray = torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
        groups["gray" if gray else "colour"].append(k)
    held: list[int] = []
    for name, members in groups.items():
        perm = torch.randperm(len(members), generator=item_generator(seed, f"photo-split/{name}", 0)).tolist()
        held += [members[j] for j in perm[:round(HELD_OUT * len(members))]]
    if not held and len(photos) >= 2:
        held = [max(groups.values(), key=len)[0]]
    return [k for k in range(len(photos)) if k not in held], sorted(held)


def random_crop(img: torch.Tensor, g: torch.Generator, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """A random resized crop of uint8 (3, H, W) ``img`` (box and flip drawn from ``g``): float (3, *size) in 0-255."""
    top, left, h, w = crop_box(img.shape[1], img.shape[2], g)
    flip = torch.rand(1, generator=g).item() < 0.5
    x = img[None, :, top:top + h, left:left + w]
    if (h, w) != tuple(size):
        try:  # resizing the uint8 crop, as a PIL / torchvision pipeline would: about 4x faster than float
            x = F.interpolate(x, size=size, mode=interpolation, antialias=True, align_corners=False)
        except (RuntimeError, NotImplementedError):
            x = resize(x[0].float(), size, interpolation).clamp(0.0, 255.0)[None]
    x = x[0].flip(-1) if flip else x[0]
    return x.float()


def photo_crop(index: int, part: str, seed: int, pre: Preprocess, pool: list[int] | None = None) -> torch.Tensor:
    """Item ``index`` of ``part``: a normalised (C, H, W) float32 crop of photo ``pool[index % len(pool)]``
    (``pool``: indices into :func:`load_photos`, default all of them)."""
    photos = load_photos()
    pool = pool if pool is not None else list(range(len(photos)))
    _, img = photos[pool[index % len(pool)]]
    x = random_crop(img, item_generator(seed, part, index), pre.size, pre.interpolation)
    return pre.normalize(to_channels(x, pre.channels), max_value=255.0)


def open_photos(pre: Preprocess, calib: int, evals: int, train: int, seed: int) -> DataSplit:
    """The ``photos`` :class:`DataSplit` (no labels), split by photo (:func:`photo_split`)."""
    photos = load_photos()
    seen, held = photo_split(seed)
    if evals and not held:
        raise NormswapError(f"only {len(photos)} scikit-image photo(s) load here: too few to hold any out for "
                            "evaluation (reinstall scikit-image, or pass eval_samples=0 / another data spec)")
    h, w = pre.size
    px = f"{h}px" if h == w else f"{h}x{w}px"
    gray = ", grayscale" if pre.channels == 1 else ""
    desc = (f"photos: {len(photos)} scikit-image photos, random resized crops {px}{gray}, normalised with "
            f"{pre.origin} (seed {seed})")

    def part(name: str, size: int, pool: list[int]) -> LazyDataset:
        return LazyDataset(size, lambda i: (photo_crop(i, name, seed, pre, pool), -1))

    names = {"seen": [photos[k][0] for k in seen], "held": [photos[k][0] for k in held]}
    counts = f"{calib} calibration" + (f", {train} training" if train else "") + f", {evals} evaluation"
    split = (f"by photo (seed {seed}): calibration and training crop {len(seen)} photos, evaluation the "
             f"{len(held)} held out ({', '.join(names['held'])}); independent seeded crops: {counts}")
    return DataSplit(desc, False, False, part("calibration", calib, seen), part("evaluation", evals, held), seed,
                     split, training=part("training", train, seen),
                     images={"calibration": names["seen"][:calib], "training": names["seen"][:train],
                             "evaluation": names["held"][:evals]})
