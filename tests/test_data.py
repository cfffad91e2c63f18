"""normswap.data: real photos, Fashion-MNIST, image folders, safetensors files, synthetic noise, splits, shards,
training parts and their distributed epochs (the stamps source: tests/test_stamps.py)."""

from __future__ import annotations

import gzip
import json
import os
import re

import numpy as np
import pytest
import torch
from torch import nn

from normswap.compat import import_torchvision
from normswap.data import (DataSplit, RandomDataWarning, default_data_spec, describe_specs, open_data)
from normswap.errors import NormswapError, UsageError
from normswap.sources import SourceSpec

from conftest import missing_asset

tv = import_torchvision()
MOBILENET = SourceSpec("torchvision:mobilenet_v2", "torchvision", "mobilenet_v2", "none")


@pytest.fixture(scope="module")
def mobilenet() -> nn.Module:
    torch.manual_seed(0)
    return tv.models.mobilenet_v2().eval()


def _all(split: DataSplit, which: str = "calibration") -> torch.Tensor:
    return torch.cat([x for x, _ in split.batches(which, batch_size=64)])


def _neighbour_corr(x: torch.Tensor) -> float:
    """Correlation of horizontally adjacent pixels: about 0.9+ for photos, about 0 for noise."""
    a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


# ----------------------------------------------------------------------------------------- photos
def test_photos_are_real_images_preprocessed_for_the_weights(mobilenet):
    data = open_data("photos", mobilenet, MOBILENET, calib_samples=8, eval_samples=4)
    assert (data.synthetic, data.has_labels) == (False, False)
    assert re.fullmatch(r"photos: 1\d scikit-image photos, random resized crops 224px, normalised with torchvision "
                        r"IMAGENET1K_V2 weights \(seed 0\)", data.description), data.description
    x = _all(data)
    assert x.shape == (8, 3, 224, 224) and x.dtype == torch.float32
    tf = tv.models.MobileNet_V2_Weights.DEFAULT.transforms()
    pixels = x * torch.tensor(tf.std).view(1, 3, 1, 1) + torch.tensor(tf.mean).view(1, 3, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5  # exactly the weights' mean/std on [0, 1] pixels
    assert _neighbour_corr(x) > 0.8  # smooth natural images, not N(0, 1) noise
    per_crop_means = x.mean((2, 3))
    assert per_crop_means.std() > 0.2 and (x.std((2, 3)) < 0.95).any()  # crops differ in content


def test_photos_deterministic_seeded_and_calibration_differs_from_evaluation(small_cnn):
    a = open_data("photos", small_cnn, calib_samples=6, eval_samples=6, seed=0)
    b = open_data("photos", small_cnn, calib_samples=6, eval_samples=6, seed=0)
    c = open_data("photos", small_cnn, calib_samples=6, eval_samples=6, seed=1)
    xa, xb, xc = _all(a), _all(b), _all(c)
    assert xa.shape == (6, 3, 32, 32)  # the probe input size of a plain conv net
    assert torch.equal(xa, xb) and torch.equal(a.evaluation[3][0], b.evaluation[3][0])
    assert not torch.allclose(xa, xc)
    ev = _all(a, "evaluation")
    assert all(not torch.allclose(xa[i], ev[i]) for i in range(6))
    assert a.split == ("by photo (seed 0): calibration and training crop 10 photos, evaluation the 4 held out "
                       "(hubble_deep_field, immunohistochemistry, coins, clock); independent seeded crops: "
                       "6 calibration, 6 evaluation")
    assert json.loads(json.dumps(a.to_dict())) == {
        "description": a.description, "synthetic": False, "has_labels": False,
        "sizes": {"calibration": 6, "training": 0, "evaluation": 6}, "seed": 0, "split": a.split,
        "images": {"calibration": ["astronaut", "chelsea", "coffee", "rocket", "retina", "camera"],
                   "training": [], "evaluation": ["hubble_deep_field", "immunohistochemistry", "coins", "clock"]}}
    assert c.images["evaluation"] != a.images["evaluation"]  # another seed holds out other photos


def test_photos_split_by_photo_evaluation_never_sees_a_training_photo(monkeypatch, small_cnn):
    """Each fake photo is one flat colour, so a crop's colour names the photo it was cut from."""
    import normswap.data.photos as ph
    colours = [(30 * k, 200, 10) for k in range(7)] + [(20 + 30 * k,) * 3 for k in range(7)]  # 7 colour, 7 gray
    fake = tuple((f"p{k}", torch.tensor(c, dtype=torch.uint8).view(3, 1, 1).expand(3, 40, 50).contiguous())
                 for k, c in enumerate(colours))
    monkeypatch.setattr(ph, "load_photos", lambda: fake)
    data = open_data("photos", small_cnn, calib_samples=20, eval_samples=12, train_samples=30, seed=5)
    seen, held = ph.photo_split(5)
    assert len(seen) == 10 and len(held) == 4 and not set(seen) & set(held)
    assert sum(k < 7 for k in held) == 2  # two colour photos and two gray ones held out
    assert data.images["evaluation"] == [f"p{k}" for k in held]
    assert data.images["calibration"] == data.images["training"] == [f"p{k}" for k in seen]
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

    def photo_of(x: torch.Tensor) -> int:
        return colours.index(tuple(round(float(v)) for v in (x * std + mean).mul(255).mean((1, 2))))

    for part, pool in (("calibration", seen), ("training", seen), ("evaluation", held)):
        dataset = getattr(data, part)
        assert [photo_of(dataset[i][0]) for i in range(len(dataset))] == [pool[i % len(pool)]
                                                                          for i in range(len(dataset))]


def test_photos_overrides_and_pretrained_cfg(small_cnn):
    data = open_data("photos", small_cnn, calib_samples=2, eval_samples=0, image_size=40, mean=[0.5], std=[0.25])
    x = _all(data)
    assert x.shape == (2, 3, 40, 40) and len(data.evaluation) == 0
    assert x.min() >= -2 - 1e-5 and x.max() <= 2 + 1e-5 and "given mean/std" in data.description
    small_cnn.pretrained_cfg = {"input_size": (3, 48, 40), "mean": (0.5,) * 3, "std": (0.5,) * 3,
                                "crop_pct": 0.9, "interpolation": "bicubic"}  # what timm models carry
    data = open_data("photos", small_cnn, calib_samples=2, eval_samples=1)
    assert _all(data).shape == (2, 3, 48, 40) and "48x40px" in data.description
    assert "timm pretrained_cfg" in data.description


def test_default_data_spec(mobilenet, small_cnn, tmp_path, monkeypatch):
    monkeypatch.setenv("NORMSWAP_STAMPS", str(tmp_path / "stamps"))  # not installed: photos, with one warning line
    with pytest.warns(UserWarning) as caught:
        assert default_data_spec(mobilenet, MOBILENET) == "photos"
    assert [str(w.message) for w in caught] == [
        f"tuxpaint-stamps-default is not installed ({tmp_path / 'stamps'} not found): using the 14 built-in photos "
        "instead of the stamps; install it with `bash scripts/setup.sh` or `apt-get install tuxpaint-stamps-default`"]
    for k, cat in enumerate(("animals", "food", "vehicles")):  # installed: stamps
        _png(tmp_path / "stamps" / cat / f"{k}.png", (9, 9, 9, 255), mode="RGBA")
    assert default_data_spec(mobilenet, MOBILENET) == "stamps"
    assert default_data_spec(small_cnn) == "stamps"
    det = SourceSpec("torchvision:fasterrcnn_resnet50_fpn", "torchvision", "fasterrcnn_resnet50_fpn", "none")
    assert default_data_spec(nn.Identity(), det) is None
    assert default_data_spec(nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4))) is None
    assert default_data_spec(nn.Sequential(nn.Conv2d(1, 4, 3))) is None


# ----------------------------------------------------------------------------------------- Fashion-MNIST
def _fmnist_or_skip() -> None:
    from normswap.data.fmnist import locate
    try:
        locate("train"), locate("test")
    except NormswapError:
        missing_asset("Fashion-MNIST", "bash scripts/setup.sh or apt-get install dataset-fashion-mnist")


def test_fashion_mnist_train_test_split_labels_and_normalisation():
    _fmnist_or_skip()
    data = open_data("fashion-mnist", calib_samples=300, eval_samples=200, seed=3)
    assert data.has_labels and not data.synthetic
    assert (len(data.calibration), len(data.evaluation)) == (300, 200)
    assert data.split.startswith("train/test files: 300 calibration from train, 200 evaluation from test")
    x, y = next(data.batches("calibration", batch_size=300))
    assert x.shape == (300, 1, 28, 28) and y.dtype == torch.long and set(y.tolist()) == set(range(10))
    assert abs(x.mean()) < 0.15 and abs(x.std() - 1) < 0.15  # the dataset's own mean 0.2860 / std 0.3530
    again = open_data("fmnist", calib_samples=300, eval_samples=200, seed=3)
    assert data.calibration.indices == again.calibration.indices
    assert torch.equal(data.evaluation[7][0], again.evaluation[7][0])
    other = open_data("fashionmnist", calib_samples=300, eval_samples=200, seed=4)
    assert data.calibration.indices != other.calibration.indices


def test_fashion_mnist_test_only_is_disjoint_and_repeats_gray_for_rgb_models(small_cnn, mobilenet):
    _fmnist_or_skip()
    data = open_data("fashion-mnist:test", small_cnn, calib_samples=64, eval_samples=32)
    assert not set(data.calibration.indices) & set(data.evaluation.indices)
    assert data.split == "test split only, seeded permutation: 64 calibration, 32 evaluation (seed 0)"
    x, _ = data.calibration[0]
    assert x.shape == (3, 28, 28) and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    big = open_data("fmnist", mobilenet, MOBILENET, calib_samples=2, eval_samples=2)
    assert big.calibration[0][0].shape == (3, 224, 224) and "3x224x224 (gray repeated)" in big.description


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    (gzip.open if str(path).endswith(".gz") else open)(path, "wb").write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files_from_root_and_env(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for part, n in (("train", 20), ("t10k", 12)):
        suffix = ".gz" if part == "t10k" else ""  # gzipped as the Debian package ships them, or plain
        _write_idx(tmp_path / f"{part}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{part}-labels-idx1-ubyte{suffix}", np.arange(n) % 10)
    data = open_data("fmnist", root=tmp_path, calib_samples=5, eval_samples=30)
    assert (len(data.calibration), len(data.evaluation)) == (5, 12)  # the test split has 12 images
    assert str(tmp_path) in data.description
    assert [data.evaluation[i][1] for i in range(12)] == [j % 10 for j in data.evaluation.indices]
    monkeypatch.setenv("NORMSWAP_DATA", str(tmp_path))
    assert str(tmp_path) in open_data("fmnist:test", calib_samples=8, eval_samples=8).description


def test_fashion_mnist_missing_says_how_to_install(tmp_path, monkeypatch):
    import normswap.data.fmnist as fm
    monkeypatch.setattr(fm, "_candidates", lambda root: [tmp_path])
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(NormswapError) as err:
        open_data("fashion-mnist")
    assert str(err.value) == (f"Fashion-MNIST not found (looked in {tmp_path}, {tmp_path / 'nowhere'}): install it "
                              "with `bash scripts/setup.sh` or `apt-get install dataset-fashion-mnist`")


# ----------------------------------------------------------------------------------------- image folders
def _png(path, color, size=(40, 30), mode="RGB") -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_image_folder_integer_classes_give_labels(tmp_path, small_cnn):
    for label, color in (("0", (255, 0, 0)), ("3", (0, 0, 255))):
        for k in range(3):
            _png(tmp_path / label / f"{k}.png", color)
    data = open_data(str(tmp_path), small_cnn, calib_samples=4, eval_samples=2)
    assert data.has_labels and data.split == "seeded permutation: 4 calibration, 2 evaluation (seed 0)"
    assert sorted(data.calibration.indices + data.evaluation.indices) == list(range(6))
    x, y = next(data.batches("calibration", batch_size=8))
    assert x.shape == (4, 3, 32, 32) and set(y.tolist()) <= {0, 3}
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    for img, label in zip(x, y.tolist()):  # a solid red / blue image comes back as exactly that colour
        want = torch.tensor([1.0, 0.0, 0.0] if label == 0 else [0.0, 0.0, 1.0]).view(3, 1, 1)
        assert torch.allclose(img * std + mean, want.expand(3, 32, 32), atol=1e-5)


def test_image_folder_names_unknown_or_categories(tmp_path, mobilenet):
    for name in ("cats", "dogs"):
        _png(tmp_path / "a" / name / "x.png", (10, 200, 30))
    data = open_data(str(tmp_path / "a"), mobilenet, MOBILENET, calib_samples=1, eval_samples=1)
    assert not data.has_labels and "labels ignored: class folders ('cats', 'dogs') are neither" in data.description
    assert data.calibration[0][1] == -1 and next(data.batches("evaluation"))[1] is None
    assert data.calibration[0][0].shape == (3, 224, 224)
    for name in ("goldfish", "tench", "great_white_shark"):
        _png(tmp_path / "b" / name / "x.png", (10, 200, 30))
    data = open_data(str(tmp_path / "b"), mobilenet, MOBILENET, calib_samples=2, eval_samples=1)
    assert data.has_labels and "category names of IMAGENET1K_V2" in data.description
    assert {data.calibration[0][1], data.calibration[1][1], data.evaluation[0][1]} == {0, 1, 2}


def test_image_folder_flat_small_gray_and_empty(tmp_path):
    for k in range(3):
        _png(tmp_path / "flat" / f"{k}.jpg", 128, mode="L")
    gray_net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    data = open_data(str(tmp_path / "flat"), gray_net, calib_samples=8, eval_samples=4)
    assert not data.has_labels and (len(data.calibration), len(data.evaluation)) == (2, 1)
    assert data.split == ("seeded permutation: 2 calibration, 1 evaluation "
                          "(seed 0; only 3 items, split 8:4 in proportion)")
    assert data.calibration[0][0].shape == (1, 32, 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NormswapError, match="holds no images"):
        open_data(str(tmp_path / "empty"))


# ----------------------------------------------------------------------------------------- tensor files
def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import save_file
    inputs, labels = torch.randn(20, 3, 8, 8, dtype=torch.float64), torch.arange(20) % 5
    save_file({"inputs": inputs, "labels": labels}, str(tmp_path / "d.safetensors"))
    data = open_data(str(tmp_path / "d.safetensors"), calib_samples=12, eval_samples=8, seed=5)
    assert data.has_labels and data.description == ("d.safetensors: 20 samples of 3x8x8 float32 (used as they are), "
                                                    "labels (seed 5)")
    assert sorted(data.calibration.indices + data.evaluation.indices) == list(range(20))
    for part in (data.calibration, data.evaluation):
        for i, j in enumerate(part.indices):
            x, y = part[i]
            assert x.dtype == torch.float32 and torch.equal(x, inputs[j].float()) and y == int(labels[j])
    save_file({"inputs": inputs}, str(tmp_path / "nolabels.safetensors"))
    assert not open_data(str(tmp_path / "nolabels.safetensors"), calib_samples=3, eval_samples=3).has_labels


def test_safetensors_bad_keys_and_pickles_refused(tmp_path):
    from safetensors.torch import save_file
    bad = tmp_path / "bad.safetensors"
    save_file({"inputs": torch.zeros(4, 2), "targets": torch.zeros(4), "extra": torch.zeros(1)}, str(bad))
    with pytest.raises(NormswapError) as err:
        open_data(str(bad))
    assert str(err.value) == (f"data file {bad} has unexpected tensors extra, targets: expected 'inputs' (N, ...) "
                              "and optionally 'labels' (N,)")
    save_file({"inputs": torch.zeros(4, 2), "labels": torch.zeros(4)}, str(bad))
    with pytest.raises(NormswapError, match="'labels' must be integers shaped \\(4,\\), got float32 \\(4,\\)"):
        open_data(str(bad))
    pt = tmp_path / "data.pt"
    torch.save({"inputs": torch.zeros(4, 2)}, str(pt))
    with pytest.raises(NormswapError, match="never unpickles data; convert it to .safetensors") as err:
        open_data(str(pt))
    assert not isinstance(err.value, UsageError)


# ----------------------------------------------------------------------------------------- synthetic, errors
def test_synthetic_warns_and_is_marked(small_cnn):
    with pytest.warns(RandomDataWarning, match="calibration statistics fitted on noise are for smoke tests only"):
        data = open_data("synthetic", small_cnn, calib_samples=4, eval_samples=2)
    assert data.synthetic and not data.has_labels and data.to_dict()["synthetic"] is True
    x = _all(data)
    assert x.shape == (4, 3, 32, 32) and abs(_neighbour_corr(x)) < 0.1
    with pytest.warns(RandomDataWarning):
        assert _all(open_data("synthetic:2x5", calib_samples=3)).shape == (3, 2, 5)
    with pytest.raises(UsageError, match="give one, e.g. synthetic:3x224x224"):
        open_data("synthetic")  # no model, no shape


def test_spec_errors(tmp_path):
    with pytest.raises(UsageError) as err:
        open_data("imagenet")
    assert str(err.value) == ("unknown data spec 'imagenet': expected stamps, stamps:CATEGORY,..., photos, "
                              "fashion-mnist, fashion-mnist:test (aliases fashionmnist, fmnist), synthetic, "
                              "synthetic:CxHxW, a directory of images, or a .safetensors file")
    missing = tmp_path / "nope"
    with pytest.raises(UsageError, match=f"data path {re.escape(str(missing))} not found"):
        open_data(str(missing))
    with pytest.raises(UsageError, match="calib_samples must be an integer >= 1, got 0"):
        open_data("photos", calib_samples=0)
    with pytest.raises(UsageError, match="eval_samples must be an integer >= 0, got -1"):
        open_data("photos", eval_samples=-1)
    lines = describe_specs().splitlines()
    assert [line.split()[0] for line in lines] == ["stamps[:CAT,...]", "photos", "fashion-mnist",
                                                   "fashion-mnist:test", "DIR", "FILE.safetensors",
                                                   "synthetic[:CxHxW]"]
    with pytest.raises(UsageError, match="train_samples must be an integer >= 0, got -2"):
        open_data("photos", train_samples=-2)


# ----------------------------------------------------------------------------------------- batches, shards
def test_batches_shards_are_disjoint_and_cover(tmp_path):
    from safetensors.torch import save_file
    inputs = torch.arange(30, dtype=torch.float32).view(30, 1)
    save_file({"inputs": inputs, "labels": torch.arange(30)}, str(tmp_path / "d.safetensors"))
    data = open_data(str(tmp_path / "d.safetensors"), calib_samples=23, eval_samples=7)
    full = [int(v) for x, _ in data.batches("calibration", batch_size=5) for v in x.flatten()]
    assert len(full) == 23
    seen = []
    for rank in range(3):
        batches = list(data.batches("calibration", batch_size=4, rank=rank, world_size=3))
        assert all(len(x) <= 4 and torch.equal(x.flatten().long(), y) for x, y in batches)
        mine = [int(v) for x, _ in batches for v in x.flatten()]
        assert mine == full[rank::3]
        seen += mine
    assert sorted(seen) == sorted(full) and len(set(seen)) == 23
    with pytest.raises(UsageError, match="rank 3 is not in 0..2"):
        next(data.batches("calibration", rank=3, world_size=3))


# ----------------------------------------------------------------------------------------- training parts
def _tensor_file(tmp_path, n: int = 40) -> str:
    from safetensors.torch import save_file
    path = str(tmp_path / "seq.safetensors")
    save_file({"inputs": torch.arange(n, dtype=torch.float32).view(n, 1), "labels": torch.arange(n)}, path)
    return path


def test_training_part_is_empty_by_default_and_disjoint_in_tensor_files(tmp_path):
    path = _tensor_file(tmp_path)
    plain = open_data(path, calib_samples=10, eval_samples=8)
    assert len(plain.training) == 0 and plain.to_dict()["sizes"] == {"calibration": 10, "training": 0,
                                                                     "evaluation": 8}
    with pytest.raises(UsageError) as err:
        next(plain.train_batches(4, epoch=0))
    assert str(err.value) == ("data 'seq.safetensors' has no training part: pass train_samples >= 4 "
                              "(open_data(..., train_samples=N))")
    data = open_data(path, calib_samples=10, eval_samples=8, train_samples=1000)
    assert data.split == ("seeded permutation: 10 calibration, 8 evaluation, 22 training (seed 0; training: the "
                          "22 items left of 1000 asked)")
    c, e, t = (set(getattr(data, p).indices) for p in ("calibration", "evaluation", "training"))
    assert len(t) == 22 and not (c & e or c & t or e & t) and c | e | t == set(range(40))
    # the held-out items do not depend on how much is trained on
    assert data.evaluation.indices == plain.evaluation.indices == open_data(path, calib_samples=10, eval_samples=8,
                                                                            train_samples=5).evaluation.indices
    x, y = next(data.batches("training", batch_size=30))
    assert x.flatten().long().tolist() == y.tolist() == data.training.indices


def test_train_batches_distributed_matches_single_process_and_is_seeded_by_epoch(tmp_path):
    data = open_data(_tensor_file(tmp_path, 200), calib_samples=1, eval_samples=1, train_samples=198)
    one = [y.tolist() for _, y in data.train_batches(12, epoch=3)]
    assert len(one) == 198 // 12 == data.train_steps(12) and all(len(b) == 12 for b in one)
    for world in (2, 3, 4):
        ranks = [[y.tolist() for _, y in data.train_batches(12 // world, epoch=3, rank=r, world_size=world)]
                 for r in range(world)]
        assert all(len(r) == len(one) for r in ranks)
        assert [sum((r[k] for r in ranks), []) for k in range(len(one))] == one  # step k: the same samples
    again = [y.tolist() for _, y in data.train_batches(12, epoch=3)]
    other = [y.tolist() for _, y in data.train_batches(12, epoch=4)]
    assert again == one and other != one and sorted(sum(other, [])) != sorted(sum(one, []))  # reshuffled
    assert set(sum(one, [])) <= set(data.training.indices) and len(set(sum(one, []))) == 16 * 12  # no repeats
    resumed = [y.tolist() for _, y in data.train_batches(12, epoch=3, start=5)]
    assert resumed == one[5:]
    x, y = next(data.train_batches(5, epoch=0, rank=1, world_size=2))
    assert x.shape == (5, 1) and torch.equal(x.flatten().long(), y)
    with pytest.raises(UsageError) as err:
        next(data.train_batches(100, epoch=0, world_size=2))
    assert str(err.value) == ("the training part of 'seq.safetensors' has 198 items, fewer than one global batch of "
                              "200 (100 per rank x 2 rank(s))")
    with pytest.raises(UsageError, match="rank 2 is not in 0..1"):
        next(data.train_batches(4, epoch=0, rank=2, world_size=2))
    with pytest.raises(UsageError, match="epoch must be an integer >= 0, got -1"):
        next(data.train_batches(4, epoch=-1))


def test_generated_training_items_are_deterministic_and_their_own_stream(small_cnn):
    data = open_data("photos", small_cnn, calib_samples=4, eval_samples=4, train_samples=24, seed=2)
    assert len(data.training) == 24 and "4 calibration, 24 training, 4 evaluation" in data.split
    again = open_data("photos", small_cnn, calib_samples=1, eval_samples=1, train_samples=24, seed=2)
    assert torch.equal(data.training[17][0], again.training[17][0])
    assert all(not torch.allclose(data.training[i][0], data.calibration[i][0]) for i in range(4))
    first = [x for x, _ in data.train_batches(8, epoch=0)]
    assert torch.equal(torch.cat(first), torch.cat([x for x, _ in again.train_batches(8, epoch=0)]))
    with pytest.warns(RandomDataWarning):
        noise = open_data("synthetic:4", calib_samples=3, eval_samples=3, train_samples=3)
    assert noise.split == "independent seeded samples: 3 calibration, 3 training, 3 evaluation (seed 0)"
    rows = [getattr(noise, p)[0][0] for p in ("calibration", "training", "evaluation")]
    assert not torch.allclose(rows[0], rows[1]) and not torch.allclose(rows[1], rows[2])


def test_fashion_mnist_training_from_the_train_split(tmp_path):
    rng = np.random.default_rng(1)
    for part, n in (("train", 50), ("t10k", 30)):
        _write_idx(tmp_path / f"{part}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{part}-labels-idx1-ubyte", np.arange(n) % 10)
    data = open_data("fmnist", root=tmp_path, calib_samples=20, eval_samples=10, train_samples=10**6)
    assert data.split == ("train/test files: 20 calibration and 50 training from train, 10 evaluation from test "
                          "(seeded permutations, seed 0)")
    assert sorted(data.training.indices) == list(range(50))  # all of the train split
    assert data.calibration.indices == open_data("fmnist", root=tmp_path, calib_samples=20,
                                                 eval_samples=10).calibration.indices
    test = open_data("fmnist:test", root=tmp_path, calib_samples=10, eval_samples=5, train_samples=12)
    c, e, t = (set(getattr(test, p).indices) for p in ("calibration", "evaluation", "training"))
    assert (len(c), len(e), len(t)) == (10, 5, 12) and not (c & e or c & t or e & t)
    assert test.split == "test split only, seeded permutation: 10 calibration, 5 evaluation, 12 training (seed 0)"


def test_image_folder_train_and_val_subfolders(tmp_path, small_cnn):
    for sub, n in (("train", 6), ("val", 3)):
        for k in range(n):
            _png(tmp_path / sub / str(k % 2) / f"{sub}{k}.png", (40 * k, 0, 0))
    data = open_data(str(tmp_path), small_cnn, calib_samples=4, eval_samples=8, train_samples=100)
    assert data.has_labels and data.split == ("train/ and val/ folders: 4 calibration and 6 training from train/, "
                                              "3 evaluation from val/ (seeded permutations, seed 0)")
    assert "6 images in train/, 3 in val/" in data.description
    assert sorted(data.images["evaluation"]) == ["val/0/val0.png", "val/0/val2.png", "val/1/val1.png"]
    assert sorted(data.images["training"]) == sorted(f"train/{k % 2}/train{k}.png" for k in range(6))
    assert set(data.images["calibration"]) <= set(data.images["training"])
    assert sorted(y for _, y in (data.evaluation[i] for i in range(3))) == [0, 0, 1]
    flat = open_data(str(tmp_path / "train"), small_cnn, calib_samples=2, eval_samples=2, train_samples=2)
    parts = [set(flat.images[p]) for p in ("calibration", "training", "evaluation")]
    assert [len(p) for p in parts] == [2, 2, 2] and not (parts[0] & parts[1] or parts[0] & parts[2]
                                                         or parts[1] & parts[2])


def test_to_dict_lists_images_and_cuts_long_lists():
    from normswap.data import LazyDataset
    names = [f"img{k}.png" for k in range(503)]
    split = DataSplit("d: x", False, False, LazyDataset(0, None), LazyDataset(0, None), 0, "s",
                      images={"calibration": names, "evaluation": ["a.png"]})
    out = json.loads(json.dumps(split.to_dict()))
    assert out["images"]["calibration"] == names[:500] + ["... and 3 more"]
    assert out["images"]["evaluation"] == ["a.png"] and split.images["calibration"] == names
    with pytest.raises(UsageError, match="unknown data part 'train': expected 'calibration', 'training' or"):
        next(split.batches("train"))
