"""Saving and loading: atomic writes, strict loads, and one-line errors for every bad file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import normswap
from normswap.errors import FileFormatError, NormswapError, OutputError
from normswap.io import check_output, read_file, write_file


@pytest.fixture
def saved(small_cnn, tmp_path):
    result = normswap.convert(small_cnn, to="uan", example_inputs=torch.randn(2, 3, 16, 16))
    return result.save(tmp_path / "cnn.safetensors"), small_cnn


def _rewrite_meta(path, name="edited", **changes):
    tensors, meta = read_file(path)
    meta.update(changes)
    out = path.with_name(f"{name}.safetensors")
    write_file(out, tensors, meta)
    return out


def test_metadata_is_self_describing(saved):
    path, _ = saved
    _, meta = read_file(path)
    assert meta["normswap_version"] == normswap.__version__
    assert meta["plan"]["format"] == "normswap.plan" and meta["plan"]["variant"] == "uan"
    assert meta["source"] is None  # built from an object: load needs model=


def test_load_without_model_for_object_source(saved):
    path, _ = saved
    with pytest.raises(NormswapError) as err:
        normswap.load(path)
    assert str(err.value) == (f"{path} was made from a model object, not a named source: pass model= "
                              "(the unconverted architecture) to load it")


def test_truncated_and_corrupted_files(saved, tmp_path):
    path, model = saved
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError, match=r"^.*cut\.safetensors is not a readable safetensors file \(truncated or corrupted\?\): "):
        normswap.load(cut, model=model)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(FileFormatError, match="is not a readable safetensors file"):
        normswap.load(junk, model=model)
    with pytest.raises(FileFormatError, match="^no such file: "):
        normswap.load(tmp_path / "missing.safetensors", model=model)


def test_plain_safetensors_is_not_a_normswap_file(tmp_path, small_cnn):
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(FileFormatError) as err:
        normswap.load(plain, model=small_cnn)
    assert str(err.value) == f"{plain} is a safetensors file but not a normswap model (no normswap metadata)"


def test_unregistered_variant_and_newer_plan(saved):
    path, model = saved
    _, meta = read_file(path)
    plan = meta["plan"]
    evil = _rewrite_meta(path, plan={**plan, "sites": [{**s, "variant": "os.system"} for s in plan["sites"]]})
    with pytest.raises(FileFormatError, match=rf"^{evil}: bad plan in the file's metadata: site 'stem.1': unknown "
                                              r"variant 'os.system'; known variants: "):  # exit 1: the file is at fault
        normswap.load(evil, model=model)
    newer = _rewrite_meta(path, "newer", plan={**plan, "version": 99})
    with pytest.raises(FileFormatError, match=rf"^{newer}: the plan is format version 99, newer than this normswap"):
        normswap.load(newer, model=model)


def test_state_dict_mismatch(saved, tmp_path):
    path, model = saved
    tensors, meta = read_file(path)
    del tensors["stem.1.mix_mean"]
    tensors["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    write_file(bad, tensors, meta)
    with pytest.raises(FileFormatError) as err:
        normswap.load(bad, model=model)
    assert str(err.value) == (f"{bad} does not fit the rebuilt model: 1 missing key(s) (stem.1.mix_mean), "
                              "1 unexpected key(s) (extra.weight)")


def test_output_checks_and_atomic_write(tmp_path, saved):
    path, _ = saved
    with pytest.raises(OutputError) as err:
        check_output(path)
    assert str(err.value) == f"{path} exists; pass --force (force=True) to overwrite it"
    assert check_output(path, force=True) == path
    with pytest.raises(OutputError, match="^cannot write .*: directory .*nope does not exist$"):
        check_output(tmp_path / "nope" / "x.safetensors")
    for parent in ("/sys/kernel", "/proc"):
        with pytest.raises(OutputError) as err:
            check_output(f"{parent}/x.safetensors")
        assert str(err.value).startswith(f"cannot write {parent}/x.safetensors: directory {parent} is not writable (")


def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "x.safetensors"
    with pytest.raises(Exception):
        write_file(out, {"a": "not a tensor"}, {"plan": {}})
    assert list(tmp_path.iterdir()) == []


def test_save_of_an_unconverted_model_is_refused(small_cnn, tmp_path):
    with pytest.raises(NormswapError, match="^this model carries no normswap plan"):
        normswap.save(small_cnn, tmp_path / "x.safetensors")
