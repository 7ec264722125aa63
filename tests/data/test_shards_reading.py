"""Reading side: list_shards (folder / glob / brace), read_index, iter_samples."""

from __future__ import annotations

import json
import logging
import tarfile

import numpy as np
import pytest
import webdataset as wds

from medssl.data.sample import decode_image, encode_png
from medssl.data.shards import iter_samples, list_shards, read_index
from medssl.io import sha256_file
from medssl.errors import MedsslError


def _write_shard(path, samples):
    with wds.TarWriter(str(path), encoder=False, mtime=0.0) as tw:
        for s in samples:
            tw.write(s)


def _sample(key, value, patient="p-1", label=None, rgb=False):
    img = (np.full((4, 5, 3), value, np.uint8) if rgb
           else np.full((4, 5), 1000 + value, np.uint16))
    meta = {"patient": patient, "modality": "CT", "channels": 3 if rgb else 1}
    sample = {"__key__": key, "img.png": encode_png(img), "json": json.dumps(meta).encode()}
    if label is not None:
        sample["cls"] = str(label).encode()
    return sample


@pytest.fixture
def folder(tmp_path):
    """Two train shards and one val shard, with index.json."""
    layout = {
        "train-000000.tar": ("train", [_sample("a-0", 0, label=1), _sample("a-1", 1, label=0)]),
        "train-000001.tar": ("train", [_sample("b-0", 2, rgb=True)]),
        "val-000000.tar": ("val", [_sample("c-0", 3, patient="p-2", label=2)]),
    }
    shards = {}
    for name, (split, samples) in layout.items():
        _write_shard(tmp_path / name, samples)
        shards[name] = {"split": split, "samples": len(samples),
                        "sha256": sha256_file(tmp_path / name)}
    index = {"format": "medssl-shards/1", "shards": shards,
             "splits": {"train": {"samples": 3, "patients": 1},
                        "val": {"samples": 1, "patients": 1}}}
    (tmp_path / "index.json").write_text(json.dumps(index))
    return tmp_path


def test_list_shards_by_folder_glob_and_brace(folder):
    assert list_shards(folder, "train") == [str(folder / "train-000000.tar"),
                                            str(folder / "train-000001.tar")]
    assert list_shards(str(folder), "val") == [str(folder / "val-000000.tar")]
    assert len(list_shards(folder)) == 3
    assert list_shards(f"{folder}/*.tar", "train") == list_shards(folder, "train")
    brace = f"{folder}/train-{{000000..000001}}.tar"
    assert list_shards(brace) == list_shards(folder, "train")


def test_list_shards_errors_are_clear(folder, tmp_path_factory):
    with pytest.raises(MedsslError, match="no shards for split 'test'"):
        list_shards(folder, "test")
    with pytest.raises(MedsslError, match="matches no shard files"):
        list_shards(f"{folder}/nothing-*.tar")
    with pytest.raises(MedsslError, match="do not exist"):
        list_shards(f"{folder}/train-{{000000..000005}}.tar")
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(MedsslError, match="index.json: missing"):
        list_shards(empty)


def test_read_index_rejects_other_formats(folder):
    assert read_index(folder)["splits"]["train"]["samples"] == 3
    (folder / "index.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(MedsslError, match="expected 'medssl-shards/1'"):
        read_index(folder)
    (folder / "index.json").write_text("{not json")
    with pytest.raises(MedsslError, match="not valid JSON"):
        read_index(folder)


def test_iter_samples_order_decode_and_labels(folder):
    got = list(iter_samples(list_shards(folder)))
    assert [s.key for s in got] == ["a-0", "a-1", "b-0", "c-0"]
    img = got[1].image
    assert img.dtype == np.uint16 and img.shape == (1, 4, 5) and int(img[0, 0, 0]) == 1001
    assert got[1].label == 0 and got[1].patient == "p-1" and got[1].split == "train"
    assert got[2].image.dtype == np.uint8 and got[2].image.shape == (3, 4, 5) and got[2].channels == 3
    assert got[2].label is None
    assert got[3].label == 2
    # same pixels as decoding the member directly
    with tarfile.open(folder / "train-000000.tar") as tar:
        raw = tar.extractfile("a-0.img.png").read()
    np.testing.assert_array_equal(got[0].image, decode_image(raw))


def test_broken_sample_is_counted_not_dropped_silently(tmp_path, caplog):
    bad = {"__key__": "x-1", "img.png": b"not a png", "json": b"{}"}
    _write_shard(tmp_path / "train-000000.tar", [_sample("x-0", 0), bad, _sample("x-2", 2)])
    shards = [str(tmp_path / "train-000000.tar")]
    with pytest.raises(MedsslError, match="1 broken shard samples, more than the 0 allowed"):
        list(iter_samples(shards))
    with caplog.at_level(logging.WARNING):
        keys = [s.key for s in iter_samples(shards, max_errors=1)]
    assert keys == ["x-0", "x-2"]
    assert "1 broken samples skipped" in caplog.text


def test_truncated_shard_raises(tmp_path):
    _write_shard(tmp_path / "train-000000.tar", [_sample(f"k-{i}", i) for i in range(3)])
    data = (tmp_path / "train-000000.tar").read_bytes()
    (tmp_path / "train-000000.tar").write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(MedsslError, match="broken shard samples"):
        list(iter_samples([str(tmp_path / "train-000000.tar")]))
