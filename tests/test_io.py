"""Saving and loading: atomic writes, strict loads, and one-line errors for every bad file."""

from __future__ import annotations

import errno
import os
import re
import signal
import stat
import subprocess
import sys

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


# ------------------------------------------------------------------------------------------ integrity
def test_flipped_bytes_are_a_checksum_mismatch(saved, tmp_path):
    path, model = saved
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(data))
    message = (f"{flipped}: checksum mismatch: its tensors or metadata changed after normswap wrote it (damaged on "
               "disk or in transfer?); write or fetch it again")
    with pytest.raises(FileFormatError) as err:
        normswap.load(flipped, model=model)
    assert str(err.value) == message
    at = data.index(b'\\"k\\": 3')  # the plan's UAN k, inside the JSON header: same length, still valid JSON
    data = bytearray(path.read_bytes())
    data[at + 7] = ord("4")
    flipped.write_bytes(bytes(data))
    with pytest.raises(FileFormatError) as err:
        read_file(flipped)
    assert str(err.value) == message


def test_files_without_checksum_still_load(saved, tmp_path):
    """Files written before the checksum existed (same metadata, no 'checksum' entry) load as before."""
    from safetensors import safe_open

    path, model = saved
    with safe_open(str(path), framework="pt") as f:
        raw = {k: v for k, v in f.metadata().items() if k != "checksum"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=raw)
    loaded = normswap.load(old, model=model)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in tensors.items())
    assert read_file(path)[1].keys() == read_file(old)[1].keys()  # the checksum is not part of the decoded metadata


# ------------------------------------------------------------------------------------------ faults
@pytest.mark.parametrize("error", ["oserror", "safetensors"])
def test_disk_full_and_long_names_are_one_line(tmp_path, monkeypatch, error):
    """Disk full is one line whether the OS says it (normswap's writer) or safetensors' does (big-endian hosts)."""
    from safetensors import SafetensorError

    def full(tensors, tmp, metadata=None):
        with open(tmp, "wb") as f:
            f.write(b"x" * 100)
        if error == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              'message: "No space left on device" })')

    monkeypatch.setattr("normswap.io._write_safetensors", full)
    out = tmp_path / "x.safetensors"
    with pytest.raises(OutputError) as err:
        write_file(out, {"a": torch.zeros(2)}, {"plan": {}})
    assert str(err.value) == f"cannot write {out}: no space left on device"
    assert list(tmp_path.iterdir()) == []
    name = "a" * 250 + ".safetensors"
    with pytest.raises(OutputError) as err:
        check_output(tmp_path / name)
    assert str(err.value) == f"cannot write {'a' * 40}...: the file name is too long (262 bytes; at most 221 here)"


def test_failed_force_overwrite_keeps_the_old_file(saved, monkeypatch):
    """The writer fails after writing half its data; a non-atomic save would have truncated the old file."""
    path, _ = saved
    before = path.read_bytes()

    def half(tensors, tmp, metadata=None):
        with open(tmp, "wb") as f:
            f.write(b"half a file")
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("normswap.io._write_safetensors", half)
    with pytest.raises(OutputError, match=r"^cannot write .*cnn\.safetensors: Input/output error$"):
        write_file(path, {"a": torch.zeros(2)}, {"plan": {}}, force=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_permissions_follow_umask_and_force_keeps_mode(tmp_path):
    old = os.umask(0o027)
    try:
        new = write_file(tmp_path / "new.safetensors", {"a": torch.zeros(2)}, {"plan": {}})
        assert stat.S_IMODE(new.stat().st_mode) == 0o640
        os.chmod(new, 0o604)
        write_file(new, {"a": torch.ones(2)}, {"plan": {}}, force=True)
        assert stat.S_IMODE(new.stat().st_mode) == 0o604 and torch.equal(read_file(new)[0]["a"], torch.ones(2))
    finally:
        os.umask(old)


def test_data_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a))), real_replace(a, b)))
    out = write_file(tmp_path / "x.safetensors", {"a": torch.zeros(2)}, {"plan": {}})
    (_, synced), (_, renamed), (_, directory) = events
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert synced == renamed and renamed.startswith(f"{tmp_path}/.x.safetensors.normswap-")
    assert directory == str(tmp_path) and out.is_file()


SLOW_WRITER = """
import sys, time, torch
import normswap.io as io
def slow(tensors, tmp, metadata=None):
    with open(tmp, "wb") as f:
        f.write(b"partial")
    print("writing", flush=True)
    time.sleep(120)
io._write_safetensors = slow
io.write_file(sys.argv[1], {"a": torch.zeros(3)}, {"plan": {}}, force=True)
"""


def _kill_mid_write(target, sig):
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(target)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.stdout.readline() == "writing\n", proc.stderr.read()
    temps = [p.name for p in target.parent.iterdir() if p.name != target.name]
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc, temps


def test_sigkill_mid_write_is_cleaned_by_the_next_write(tmp_path):
    target = tmp_path / "m.safetensors"
    write_file(target, {"a": torch.zeros(1)}, {"plan": {}})
    before = target.read_bytes()
    proc, temps = _kill_mid_write(target, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert len(temps) == 1 and re.fullmatch(rf"\.m\.safetensors\.normswap-{proc.pid}-[0-9a-f]{{8}}\.tmp", temps[0])
    assert target.read_bytes() == before and (tmp_path / temps[0]).is_file()  # left behind by the killed write
    (tmp_path / ".other.safetensors.normswap-1-0123abcd.tmp").write_bytes(b"")  # another target's: not ours
    write_file(target, {"a": torch.ones(1)}, {"plan": {}}, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.safetensors.normswap-1-0123abcd.tmp",
                                                           "m.safetensors"]


def test_sigterm_mid_write_leaves_nothing(tmp_path):
    target = tmp_path / "m.safetensors"
    write_file(target, {"a": torch.zeros(1)}, {"plan": {}})
    before = target.read_bytes()
    proc, temps = _kill_mid_write(target, signal.SIGTERM)
    assert len(temps) == 1 and proc.returncode != 0
    assert "terminated (SIGTERM)" in proc.stderr.read()
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


# ------------------------------------------------------------------------------------------ the writer
def test_writer_output_is_what_safetensors_reads(tmp_path):
    """normswap writes safetensors files itself (straight from the tensors' memory): every dtype, empty and 0-dim
    tensors, views, non-contiguous and shared-storage tensors read back bit for bit with safetensors' own reader,
    every entry aligned to its element size, the header's entries those safetensors' own writer makes."""
    import json as _json
    import struct

    from safetensors import safe_open

    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    tensors = {"f32": base, "t.view": base[1:3], "t.transposed": base.t(), "f64": torch.randn(3, generator=g).double(),
               "f16": torch.randn(2, 3, generator=g).half(), "bf16": torch.randn(5, generator=g).bfloat16(),
               "i64": torch.tensor(7), "bool": torch.tensor([True, False, True]), "u8": torch.arange(5, dtype=torch.uint8),
               "empty": torch.zeros(0, 4), "i32": torch.arange(3, dtype=torch.int32)}
    out = write_file(tmp_path / "all.safetensors", tensors, {"plan": {"x": "é"}})
    got, meta = read_file(out)  # the checksum checks
    assert meta == {"plan": {"x": "é"}} and got.keys() == tensors.keys()
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t), name
    data = out.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    assert size % 8 == 0
    header = _json.loads(data[8:8 + size])
    ends = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    assert ends[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ends, ends[1:])) and ends[-1][1] == len(data) - 8 - size
    for name, entry in header.items():
        if name != "__metadata__":
            assert entry["data_offsets"][0] % tensors[name].element_size() == 0, name
    reference = tmp_path / "reference.safetensors"
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(reference), metadata=header["__metadata__"])
    with safe_open(str(reference), framework="pt") as f:
        ref_meta = f.metadata()
    assert ref_meta == header["__metadata__"]
    ref_size = struct.unpack("<Q", reference.read_bytes()[:8])[0]
    ref_header = _json.loads(reference.read_bytes()[8:8 + ref_size])
    strip = lambda h: {k: {f: x for f, x in v.items() if f != "data_offsets"} for k, v in h.items()}  # noqa: E731
    assert strip(ref_header) == strip(header)  # the same entries (the data's order may differ: it is free)


def test_writer_refuses_what_safetensors_cannot_store(tmp_path):
    with pytest.raises(NormswapError, match=r"^cannot save 'q': safetensors has no dtype complex128$"):
        write_file(tmp_path / "x.safetensors", {"a": torch.zeros(2), "q": torch.zeros(2, dtype=torch.complex128)},
                   {"plan": {}})
    assert list(tmp_path.iterdir()) == []


def test_save_keeps_tied_weights_and_leaves_the_model_alone(tmp_path):
    """Tied tensors are written as separate entries (the state_dict's keys) and load back tied or not, as the
    architecture makes them; saving reads the model's tensors without changing them."""
    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 4)).eval()
        model[2].weight = model[0].weight
        return model

    model = build()
    r = normswap.convert(model, to="uan", example_inputs=torch.randn(2, 4))
    before = {k: (v.clone(), v._version) for k, v in r.model.state_dict().items()}
    path = r.save(tmp_path / "tied.safetensors")
    assert all(torch.equal(v, before[k][0]) and v._version == before[k][1] for k, v in r.model.state_dict().items())
    loaded = normswap.load(path, model=build())
    assert loaded[2].weight is loaded[0].weight
    x = torch.randn(3, 4)
    assert torch.equal(loaded(x), r.model(x))


def test_load_converts_a_model_it_rebuilt_in_place_and_copies_a_given_one(r18_file, small_cnn_uan_file, monkeypatch):
    """The architecture load builds from the file's source is its own: converted in place, not copied first. A
    model passed in is the caller's: a copy is converted and the argument is left as it was."""
    import normswap.surgery.apply as apply_mod

    copies = []
    real = apply_mod.copy_model
    monkeypatch.setattr(apply_mod, "copy_model", lambda m, *a, **k: (copies.append(m), real(m, *a, **k))[1])
    loaded = normswap.load(r18_file)
    assert copies == [] and type(loaded.layer4[1].bn2).__name__ == "UANChannel"
    path, model = small_cnn_uan_file
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    loaded = normswap.load(path, model=model)
    assert copies == [model] and [type(m) for m in model.modules()] == types
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert any(type(m).__name__ == "UANChannel" for m in loaded.modules())
