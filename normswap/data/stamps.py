"""``stamps``: real object photographs from Tux Paint's stamps, composited onto seeded backgrounds, split by image.

Debian's ``tuxpaint-stamps-default`` (GPL-2 data; ``bash scripts/setup.sh`` installs it) puts about 800
PNG stamps under ``/usr/share/tuxpaint/stamps/<category>/...`` (``$NORMSWAP_STAMPS`` points elsewhere).
Left out: ``symbols/`` (alphabets, digits, money, shapes, signs) and every ``cartoon/`` folder (drawings);
about 440 photographs of objects on transparent backgrounds remain (animals, food, vehicles, ...).

The split is **by image**, per top-level category: a permutation seeded by (seed, category) deals the
category's images out in turn to evaluation, calibration, training, training, so about 1/4 of the images are
held out for evaluation, 1/4 calibrate and 1/2 train, whatever the sample counts, and no image is in two
parts. Picking categories (``stamps:animals,food``) keeps each image in the part it has in ``stamps``.

Item ``i`` of a part composites image ``i % n`` of that part's ``n`` images (in an order seeded by (seed,
part), so a few items already span the categories) onto a background drawn from a
generator seeded by (seed, part, i): a plain colour, a linear gradient, or a random crop of a built-in
photo (:mod:`normswap.data.photos`: the seen photos for calibration and training, the held-out photos for
evaluation), with the object scaled to 70-100 % of the image (upscaled at most 4x), placed at random and
flipped with probability 1/2. Each PNG is decoded once per process, when first used.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from normswap.data.base import DataSplit, LazyDataset, item_generator
from normswap.data.preprocess import Preprocess, to_channels
from normswap.errors import NormswapError, UsageError

SYSTEM_DIR = Path("/usr/share/tuxpaint/stamps")
PACKAGE = "tuxpaint-stamps-default"
INSTALL_HINT = f"install it with `bash scripts/setup.sh` or `apt-get install {PACKAGE}`"
LEFT_OUT = "symbols/ and cartoon/ folders (drawings: letters, digits, money, shapes, cartoons)"
DEAL = ("evaluation", "calibration", "training", "training")  # image j of a category's permutation -> DEAL[j % 4]
OBJECT_SCALE = (0.7, 1.0)  # the object's box as a fraction of the image's (ImageNet objects fill the frame)
MAX_UPSCALE = 4.0
MAX_SIDE = 768  # stamps are decoded at most this large (a few are 2000+ px)


def stamps_dir() -> Path:
    """Where the stamps are: ``$NORMSWAP_STAMPS``, else Debian's ``/usr/share/tuxpaint/stamps``."""
    env = os.environ.get("NORMSWAP_STAMPS")
    return Path(env).expanduser() if env else SYSTEM_DIR


@functools.lru_cache(maxsize=4)
def scan(root: str) -> dict[str, tuple[str, ...]]:
    """Top-level category -> the photograph stamps in it (sorted paths relative to ``root``), drawings left out."""
    base = Path(root)
    found: dict[str, list[str]] = {}
    for path in sorted(base.rglob("*.png")):
        rel = path.relative_to(base).as_posix()
        parts = rel.split("/")
        if len(parts) < 2 or parts[0] == "symbols" or "cartoon" in parts[:-1]:
            continue
        found.setdefault(parts[0], []).append(rel)
    return {cat: tuple(files) for cat, files in sorted(found.items())}


def available() -> bool:
    """Whether the stamps are installed (at least 3 photographs, enough for a three-way split)."""
    root = stamps_dir()
    return root.is_dir() and sum(len(v) for v in scan(str(root)).values()) >= 3


def split_images(categories: dict[str, tuple[str, ...]], seed: int) -> dict[str, list[str]]:
    """Part -> image paths: per category a seeded permutation dealt out as evaluation, calibration, training,
    training (:data:`DEAL`). Disjoint, independent of the sample counts.

    >>> split_images({"a": tuple("pqrstuvw")}, seed=0)
    {'calibration': ['q', 'p'], 'training': ['v', 't', 'u', 'r'], 'evaluation': ['w', 's']}
    """
    parts: dict[str, list[str]] = {"calibration": [], "training": [], "evaluation": []}
    for cat, files in sorted(categories.items()):
        perm = torch.randperm(len(files), generator=item_generator(seed, f"stamp-split/{cat}", 0)).tolist()
        for j, k in enumerate(perm):
            parts[DEAL[j % len(DEAL)]].append(files[k])
    return parts


def select(categories: dict[str, tuple[str, ...]], arg: str) -> set[str] | None:
    """The stamps ``stamps:CAT,CAT/SUB,...`` picks (``None``: all); an unknown category is a one-line error."""
    wanted = [c.strip().strip("/") for c in arg.split(",") if c.strip().strip("/")]
    if not wanted:
        return None
    chosen: set[str] = set()
    for c in wanted:
        top = c.split("/")[0]
        hits = {f for f in categories.get(top, ()) if f == c or f.startswith(c + "/")}
        if not hits:
            raise UsageError(f"unknown stamps category '{c}': known categories are {', '.join(categories)} "
                             "(or CATEGORY/SUBFOLDER)")
        chosen |= hits
    return chosen


@functools.lru_cache(maxsize=None)
def load_stamp(path: str) -> torch.Tensor:
    """The stamp at ``path`` as premultiplied uint8 RGBa (4, h, w), cropped to its opaque box, at most 768 px."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            img = img.convert("RGBA")
    except (OSError, UnidentifiedImageError) as exc:
        raise NormswapError(f"cannot read stamp {path}: {exc}") from None
    box = img.getchannel("A").getbbox()
    if box is None:
        raise NormswapError(f"stamp {path} is fully transparent")
    img = img.crop(box).convert("RGBa")
    if max(img.size) > MAX_SIDE:
        f = MAX_SIDE / max(img.size)
        img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.LANCZOS)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def background(g: torch.Generator, size: tuple[int, int], photos: list[torch.Tensor], interpolation: str
               ) -> tuple[torch.Tensor, str]:
    """A float (3, H, W) background in 0-255 and its kind: ``plain``, ``gradient`` or ``photo`` (a random crop of
    one of ``photos``; kinds are equally likely, ``photo`` only when there are photos)."""
    h, w = size
    kind = ("plain", "gradient", "photo")[int(torch.randint(0, 3 if photos else 2, (1,), generator=g))]
    if kind == "photo":
        from normswap.data.photos import random_crop
        img = photos[int(torch.randint(0, len(photos), (1,), generator=g))]
        return random_crop(img, g, size, interpolation), kind
    c1 = torch.rand(3, generator=g) * 255
    if kind == "plain":
        return c1.view(3, 1, 1).expand(3, h, w).clone(), kind
    c2 = torch.rand(3, generator=g) * 255
    angle = 2 * math.pi * torch.rand(1, generator=g).item()
    t = torch.linspace(0, 1, w).view(1, w) * math.cos(angle) + torch.linspace(0, 1, h).view(h, 1) * math.sin(angle)
    t = (t - t.min()) / (t.max() - t.min()).clamp_min(1e-6)
    return c1.view(3, 1, 1) + (c2 - c1).view(3, 1, 1) * t, kind


def composite(stamp: torch.Tensor, g: torch.Generator, size: tuple[int, int], photos: list[torch.Tensor],
              interpolation: str = "bilinear") -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """``stamp`` (premultiplied uint8 RGBa) scaled, placed and flipped at random over a :func:`background`:
    float (3, H, W) in 0-255, and the object's box (top, left, height, width)."""
    h, w = size
    bg, _ = background(g, size, photos, interpolation)
    sh, sw = stamp.shape[1:]
    frac = OBJECT_SCALE[0] + (OBJECT_SCALE[1] - OBJECT_SCALE[0]) * torch.rand(1, generator=g).item()
    f = min(frac * min(h / sh, w / sw), MAX_UPSCALE)
    oh, ow = min(h, max(1, round(sh * f))), min(w, max(1, round(sw * f)))
    top = int(torch.randint(0, h - oh + 1, (1,), generator=g))
    left = int(torch.randint(0, w - ow + 1, (1,), generator=g))
    obj = stamp.float()[None]
    if (oh, ow) != (sh, sw):
        kw = {"antialias": True, "align_corners": False} if interpolation != "nearest" else {}
        obj = F.interpolate(obj, size=(oh, ow), mode=interpolation, **kw).clamp(0.0, 255.0)
    obj = obj[0].flip(-1) if torch.rand(1, generator=g).item() < 0.5 else obj[0]
    alpha = obj[3:4] / 255.0
    region = bg[:, top:top + oh, left:left + ow]
    bg[:, top:top + oh, left:left + ow] = obj[:3] + region * (1.0 - alpha)  # premultiplied "over"
    return bg, (top, left, oh, ow)


def _background_photos(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor], str]:
    """(seen photos, held-out photos, how they are described): the ``photos`` split for ``seed``, so evaluation
    backgrounds are never photos that calibration or training saw; no photos without scikit-image."""
    try:
        from normswap.data.photos import load_photos, photo_split
        photos = load_photos()
        seen, held = photo_split(seed)
    except NormswapError:
        return [], [], "plain colours and gradients (no scikit-image for photo backgrounds)"
    return ([photos[k][1] for k in seen], [photos[k][1] for k in held],
            f"plain colours, gradients and crops of the {len(seen)} seen scikit-image photos (evaluation: the "
            f"{len(held)} held-out ones)")


def open_stamps(pre: Preprocess, arg: str, calib: int, evals: int, train: int, seed: int) -> DataSplit:
    """The ``stamps[:CATEGORY,...]`` :class:`DataSplit` (no labels), split by image (:func:`split_images`)."""
    root = stamps_dir()
    if not root.is_dir():
        raise NormswapError(f"the 'stamps' data needs Debian's {PACKAGE} ({root} not found): {INSTALL_HINT}")
    categories = scan(str(root))
    if not categories:
        raise NormswapError(f"{root} holds no stamp photographs (expected CATEGORY/.../NAME.png, {LEFT_OUT} "
                            f"left out): {INSTALL_HINT}")
    chosen = select(categories, arg)
    parts = {part: [f for f in files if chosen is None or f in chosen]
             for part, files in split_images(categories, seed).items()}
    for part, files in parts.items():  # items cycle through the images in a seeded order, across categories
        order = torch.randperm(len(files), generator=item_generator(seed, f"stamp-order/{part}", 0)).tolist()
        parts[part] = [files[k] for k in order]
    counts = {"calibration": calib, "training": train, "evaluation": evals}
    for part, count in counts.items():
        if count and not parts[part]:
            n = sum(len(v) for v in parts.values())
            raise UsageError(f"stamps{':' + arg if arg else ''} has only {n} image(s), none left for {part}: "
                             "pick more categories")
    seen_photos, held_photos, how_bg = _background_photos(seed)

    def part(name: str, size: int, files: list[str], photos: list[torch.Tensor]) -> LazyDataset:
        def get(i: int) -> tuple[torch.Tensor, int]:
            stamp = load_stamp(str(root / files[i % len(files)]))
            x, _ = composite(stamp, item_generator(seed, name, i), pre.size, photos, pre.interpolation)
            return pre.normalize(to_channels(x, pre.channels), max_value=255.0), -1
        return LazyDataset(size, get)

    n = sum(len(v) for v in parts.values())
    h, w = pre.size
    px = f"{h}px" if h == w else f"{h}x{w}px"
    picked = f"categories {', '.join(sorted({f.split('/')[0] for f in chosen}))}" if chosen is not None else \
        f"{len(categories)} categories"
    desc = (f"stamps: {n} object photographs from Tux Paint's stamps (Debian {PACKAGE}, GPL-2; {picked}; "
            f"{LEFT_OUT} left out), composited on seeded backgrounds, {px}"
            f"{', grayscale' if pre.channels == 1 else ''}, normalised with {pre.origin} (seed {seed})")
    made = f"{calib} calibration" + (f", {train} training" if train else "") + f", {evals} evaluation"
    split = (f"by image, per category (seed {seed}): {len(parts['evaluation'])} images held out for evaluation, "
             f"{len(parts['calibration'])} for calibration, {len(parts['training'])} for training, none shared; "
             f"backgrounds: {how_bg}; composites: {made}")
    return DataSplit(desc, False, False, part("calibration", calib, parts["calibration"], seen_photos),
                     part("evaluation", evals, parts["evaluation"], held_photos), seed, split,
                     training=part("training", train, parts["training"], seen_photos),
                     images={p: parts[p][:count] for p, count in counts.items()})
