"""The ``stamps`` data source: a tiny PNG pool in a tmp dir for the logic (split by image, categories, errors,
determinism, compositing), and the real Debian package where it is installed (setup installs it)."""

from __future__ import annotations

import json

import normswap  # noqa: F401  (before torchvision: the import guard)
import pytest
import torch

from normswap.data import open_data
from normswap.data import stamps as st
from normswap.errors import NormswapError, UsageError

from conftest import missing_asset

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
POOL = {"animals": 9, "food": 6, "vehicles": 4, "people": 1}  # photographs per category


def _stamp(path, color, size=(30, 20), border=4) -> None:
    """A solid opaque rectangle inside a fully transparent border."""
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGBA", (size[0] + 2 * border, size[1] + 2 * border), (0, 0, 0, 0))
    img.paste(Image.new("RGBA", size, (*color, 255)), (border, border))
    img.save(path)


@pytest.fixture()
def pool(tmp_path, monkeypatch):
    """20 photograph stamps in 4 categories (animals has a subfolder), plus drawings that must be left out."""
    root = tmp_path / "stamps"
    for cat, n in POOL.items():
        for k in range(n):
            sub = "birds/" if cat == "animals" and k < 3 else ""
            _stamp(root / cat / f"{sub}{cat}{k}.png", (10 * k, 100, 200))
    _stamp(root / "symbols" / "alphabets" / "a.png", (0, 0, 0))
    _stamp(root / "food" / "cartoon" / "apple.png", (255, 0, 0))
    _stamp(root / "cartoon" / "tux.png", (0, 0, 0))
    (root / "food" / "apple.txt").write_text("not an image")
    monkeypatch.setenv("NORMSWAP_STAMPS", str(root))
    return root


def _pixels(x: torch.Tensor) -> torch.Tensor:
    return (x * STD + MEAN) * 255


def test_scan_leaves_out_symbols_and_cartoons(pool):
    cats = st.scan(str(pool))
    assert {c: len(v) for c, v in cats.items()} == POOL
    assert "animals/birds/animals0.png" in cats["animals"]
    assert not any("cartoon" in f or f.startswith("symbols") for v in cats.values() for f in v)


def test_split_by_image_is_disjoint_complete_and_independent_of_counts(pool, small_cnn):
    data = open_data("stamps", small_cnn, calib_samples=40, eval_samples=30, train_samples=50, seed=3)
    parts = {p: set(data.images[p]) for p in ("calibration", "training", "evaluation")}
    assert not (parts["calibration"] & parts["training"] or parts["calibration"] & parts["evaluation"]
                or parts["training"] & parts["evaluation"])
    assert set().union(*parts.values()) == {f for v in st.scan(str(pool)).values() for f in v}
    # dealt per category: evaluation, calibration, training, training -> animals 3/2/4, food 2/2/2, vehicles
    # 1/1/2, people 1/0/0
    assert {p: len(v) for p, v in parts.items()} == {"calibration": 5, "training": 8, "evaluation": 7}
    assert "7 images held out for evaluation, 5 for calibration, 8 for training, none shared" in data.split
    small = open_data("stamps", small_cnn, calib_samples=2, eval_samples=3, seed=3)
    assert set(small.images["evaluation"]) < parts["evaluation"] and small.images["training"] == []
    assert small.images["evaluation"] == data.images["evaluation"][:3]  # one seeded order, whatever the counts
    other = open_data("stamps", small_cnn, calib_samples=40, eval_samples=30, seed=4)
    assert set(other.images["evaluation"]) != parts["evaluation"]
    out = json.loads(json.dumps(data.to_dict()))
    assert out["sizes"] == {"calibration": 40, "training": 50, "evaluation": 30}
    assert sorted(out["images"]["evaluation"]) == sorted(parts["evaluation"])


def test_items_show_their_own_parts_images(pool, small_cnn):
    """Each stamp has its own colour, so the pixels at the object's centre name the stamp an item shows."""
    data = open_data("stamps:food,vehicles", small_cnn, image_size=64, calib_samples=12, eval_samples=12,
                     train_samples=12, seed=1)
    colour = {f: (10 * int(f.split("/")[-1][len(f.split("/")[0]):-4]), 100, 200) for f in
              sum((list(v) for v in st.scan(str(pool)).values()), [])}
    seen, held, _ = st._background_photos(1)
    for part in ("calibration", "training", "evaluation"):
        dataset, files = getattr(data, part), data.images[part]
        for i in range(len(dataset)):
            stamp = st.load_stamp(str(pool / files[i % len(files)]))
            photos = held if part == "evaluation" else seen
            _, box = st.composite(stamp, st.item_generator(1, part, i), (64, 64), photos)
            top, left, h, w = box
            px = _pixels(dataset[i][0])[:, top + h // 2, left + w // 2]
            assert torch.allclose(px, torch.tensor(colour[files[i % len(files)]], dtype=torch.float32), atol=0.05)


def test_category_selection_keeps_each_images_part_and_rejects_unknown_ones(pool, small_cnn):
    full = open_data("stamps", small_cnn, calib_samples=4, eval_samples=20, train_samples=20)
    birds = open_data("stamps:animals/birds,vehicles", small_cnn, calib_samples=4, eval_samples=20, train_samples=20)
    for part in ("calibration", "training", "evaluation"):
        assert all(f.startswith(("animals/birds/", "vehicles/")) for f in birds.images[part])
        assert set(birds.images[part]) <= set(full.images[part])  # the same part as in the full pool
    assert "categories animals, vehicles" in birds.description and "4 categories" in full.description
    with pytest.raises(UsageError) as err:
        open_data("stamps:animals,plants", small_cnn)
    assert str(err.value) == ("unknown stamps category 'plants': known categories are animals, food, people, "
                              "vehicles (or CATEGORY/SUBFOLDER)")
    with pytest.raises(UsageError, match="unknown stamps category 'cartoon'"):
        open_data("stamps:cartoon", small_cnn)
    with pytest.raises(UsageError) as err:
        open_data("stamps:people", small_cnn, calib_samples=1, eval_samples=1)
    assert str(err.value) == "stamps:people has only 1 image(s), none left for calibration: pick more categories"


def test_deterministic_per_index_and_seed(pool, small_cnn):
    a = open_data("stamps", small_cnn, calib_samples=6, eval_samples=6, train_samples=6)
    b = open_data("stamps", small_cnn, calib_samples=6, eval_samples=6, train_samples=6)
    c = open_data("stamps", small_cnn, calib_samples=6, eval_samples=6, train_samples=6, seed=1)
    for part in ("calibration", "training", "evaluation"):
        xa = torch.stack([getattr(a, part)[i][0] for i in range(6)])
        assert xa.shape == (6, 3, 32, 32) and torch.equal(xa, torch.stack([getattr(b, part)[i][0] for i in range(6)]))
        assert not torch.allclose(xa, torch.stack([getattr(c, part)[i][0] for i in range(6)]))
    st.load_stamp.cache_clear()
    assert torch.equal(a.training[4][0], b.training[4][0])  # decoded again: the same item
    assert [x for x, _ in a.train_batches(3, epoch=1)][1].shape == (3, 3, 32, 32)


def test_composite_keeps_the_object_and_blends_its_edges():
    import numpy as np
    from PIL import Image
    img = Image.new("RGBA", (9, 7), (0, 0, 0, 0))
    img.paste(Image.new("RGBA", (8, 6), (250, 20, 40, 255)), (1, 1))
    img.putpixel((0, 0), (0, 0, 255, 128))  # half-transparent blue: premultiplied, then "over" the background
    stamp = torch.from_numpy(np.array(img.convert("RGBa"))).permute(2, 0, 1)
    red = torch.tensor([250.0, 20.0, 40.0]).view(3, 1)
    for seed in range(20):
        out, (top, left, h, w) = st.composite(stamp, torch.Generator().manual_seed(seed), (50, 60), [], "nearest")
        bg, _ = st.background(torch.Generator().manual_seed(seed), (50, 60), [], "nearest")
        assert out.shape == (3, 50, 60) and 0 <= out.min() and out.max() <= 255
        assert top + h <= 50 and left + w <= 60 and abs(h / 7 - w / 9) < 0.15  # aspect kept
        fit = min(50 / 7, 60 / 9)  # the scale at which the object just fits
        lo, hi = (min(f * fit, st.MAX_UPSCALE) for f in st.OBJECT_SCALE)
        assert lo - 0.15 <= h / 7 <= hi + 0.15  # OBJECT_SCALE of the image, upscaled at most 4x
        inside = torch.zeros(50, 60, dtype=torch.bool)
        inside[top:top + h, left:left + w] = True
        assert torch.equal(out[:, ~inside], bg[:, ~inside])  # the background is untouched around the object
        box, under = out[:, inside], bg[:, inside]
        is_red = (box - red).abs().amax(0) < 1e-3
        assert 0.7 < is_red.float().mean() < 0.82  # 48 of 63 stamp pixels are opaque red
        blend = ~is_red & (box - under).abs().amax(0).gt(1e-3)
        assert blend.any()
        want = torch.tensor([0.0, 0.0, 128.0]).view(3, 1) + under[:, blend] * (1 - 128 / 255)
        assert torch.allclose(box[:, blend], want, atol=1e-3)


def test_backgrounds_are_plain_gradient_or_photo():
    photo = torch.zeros(3, 40, 40, dtype=torch.uint8)
    photo[0] = 200
    kinds = {}
    for seed in range(60):
        bg, kind = st.background(torch.Generator().manual_seed(seed), (16, 24), [photo], "bilinear")
        kinds[kind] = kinds.get(kind, 0) + 1
        flat = bg.flatten(1)
        if kind == "plain":
            assert (flat.amax(1) - flat.amin(1)).max() < 1e-4
        elif kind == "gradient":
            assert (flat.amax(1) - flat.amin(1)).max() > 1.0 and 0 <= bg.min() and bg.max() <= 255
        else:
            assert torch.allclose(bg[0], torch.full((16, 24), 200.0)) and bg[1:].abs().max() == 0
    assert set(kinds) == {"plain", "gradient", "photo"} and min(kinds.values()) >= 10
    assert {st.background(torch.Generator().manual_seed(s), (8, 8), [], "bilinear")[1] for s in range(30)} == \
        {"plain", "gradient"}


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMSWAP_STAMPS", str(tmp_path / "none"))
    assert not st.available()
    with pytest.raises(NormswapError) as err:
        open_data("stamps")
    assert str(err.value) == (f"the 'stamps' data needs Debian's tuxpaint-stamps-default ({tmp_path / 'none'} not "
                              "found): install it with `bash scripts/setup.sh` or `apt-get install "
                              "tuxpaint-stamps-default`")
    assert not isinstance(err.value, UsageError)
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("NORMSWAP_STAMPS", str(tmp_path / "empty"))
    with pytest.raises(NormswapError, match="empty holds no stamp photographs"):
        open_data("stamps")


# ----------------------------------------------------------------------------------------- the real package
@pytest.fixture()
def real(monkeypatch):
    monkeypatch.delenv("NORMSWAP_STAMPS", raising=False)
    if not st.available():
        missing_asset("tuxpaint-stamps-default", "bash scripts/setup.sh installs it")
    return st.stamps_dir()


def test_real_package_pool_and_split(real):
    cats = st.scan(str(real))
    assert 400 <= sum(len(v) for v in cats.values()) <= 480 and {"animals", "food", "vehicles"} <= set(cats)
    assert "symbols" not in cats and "cartoon" not in cats
    data = open_data("stamps", calib_samples=8, eval_samples=8, train_samples=8)
    assert data.description.startswith("stamps: 439 object photographs from Tux Paint's stamps (Debian "
                                       "tuxpaint-stamps-default, GPL-2; 15 categories;")
    held, seen = set(st.split_images(cats, 0)["evaluation"]), set(data.images["calibration"] + data.images["training"])
    assert len(held) >= 100 and not held & seen and set(data.images["evaluation"]) <= held
    x, _ = next(data.batches("evaluation", 8))
    pixels = x * STD + MEAN
    assert x.shape == (8, 3, 224, 224) and pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_real_pretrained_mobilenet_is_confident_on_held_out_stamps(real):
    from normswap.compat import import_torchvision
    from normswap.sources import SourceSpec
    tv = import_torchvision()
    try:
        model = tv.models.mobilenet_v2(weights="IMAGENET1K_V1").eval()
    except Exception:  # noqa: BLE001 - weights not in the hub cache (setup puts them there)
        missing_asset("the pretrained MobileNetV2 weights (torch's hub cache)", "bash scripts/setup.sh")
    source = SourceSpec("torchvision:mobilenet_v2", "torchvision", "mobilenet_v2", "IMAGENET1K_V1")
    data = open_data("stamps", model, source, calib_samples=1, eval_samples=48)
    with torch.no_grad():
        probs = torch.cat([model(x).softmax(1) for x, _ in data.batches("evaluation", 16)])
    confident = (probs.max(1).values > 0.5).float().mean().item()
    assert confident >= 0.3, confident  # 43.6 % of 512 held-out composites (docs/data.md)
