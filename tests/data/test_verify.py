"""`medssl shards verify`: each kind of damage is found and names the shard at fault."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import webdataset as wds

from medssl.cli import main
from medssl.data.sample import encode_png
from medssl.io import sha256_file
from medssl.data.verify import verify_command, verify_shards
from medssl.errors import MedsslError


def _sample(key, patient, extra_meta=None, extra_members=None):
    meta = {"patient": patient, "modality": "CT", "channels": 1, **(extra_meta or {})}
    sample = {"__key__": key, "img.png": encode_png(np.zeros((4, 4), np.uint16)),
              "json": json.dumps(meta).encode()}
    sample.update(extra_members or {})
    return sample


def make_folder(root, layout, index_patch=None):
    """Write shards ``{name: (split, [samples])}`` and a matching index.json."""
    shards, splits = {}, {}
    for name, (split, samples) in layout.items():
        with wds.TarWriter(str(root / name), encoder=False, mtime=0.0) as tw:
            for s in samples:
                tw.write(s)
        shards[name] = {"split": split, "samples": len(samples),
                        "sha256": sha256_file(root / name)}
        entry = splits.setdefault(split, {"samples": 0, "patients": set()})
        entry["samples"] += len(samples)
        entry["patients"] |= {json.loads(s["json"])["patient"] for s in samples}
    index = {"format": "medssl-shards/1", "shards": shards,
             "splits": {s: {"samples": v["samples"], "patients": len(v["patients"])}
                        for s, v in splits.items()}}
    if index_patch:
        index_patch(index)
    (root / "index.json").write_text(json.dumps(index))
    return root


GOOD = {
    "train-000000.tar": ("train", [_sample("a-0", "p-a"), _sample("a-1", "p-a")]),
    "train-000001.tar": ("train", [_sample("b-0", "p-b", extra_members={"cls": b"1"})]),
    "val-000000.tar": ("val", [_sample("c-0", "p-c")]),
}


def test_sound_folder_passes(tmp_path, capsys):
    make_folder(tmp_path, GOOD)
    assert verify_shards(tmp_path) == []
    assert main(["shards", "verify", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("OK:")


def test_one_corrupt_byte_fails_naming_the_shard(tmp_path, caplog):
    make_folder(tmp_path, GOOD)
    path = tmp_path / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF  # inside the first member's payload
    path.write_bytes(bytes(data))
    problems = verify_shards(tmp_path)
    assert any(p.startswith("train-000001.tar: sha256") for p in problems), problems
    assert all("train-000000.tar" not in p for p in problems)
    with caplog.at_level(logging.ERROR):
        assert verify_command(tmp_path) == 1
    assert "train-000001.tar" in caplog.text


def test_patient_in_two_splits_is_caught(tmp_path):
    layout = dict(GOOD)
    layout["val-000000.tar"] = ("val", [_sample("c-0", "p-a")])  # p-a is also in train
    make_folder(tmp_path, layout)
    problems = verify_shards(tmp_path)
    assert len(problems) == 1
    assert "patient p-a is in more than one split" in problems[0]
    assert "train-000000.tar" in problems[0] and "val-000000.tar" in problems[0]


def test_missing_unlisted_and_miscounted_shards(tmp_path):
    def patch(index):
        index["shards"]["train-000000.tar"]["samples"] = 3
        index["splits"]["val"]["samples"] = 5

    make_folder(tmp_path, GOOD, index_patch=patch)
    (tmp_path / "val-000000.tar").rename(tmp_path / "val-000001.tar")
    problems = "\n".join(verify_shards(tmp_path))
    assert "val-000000.tar: listed in index.json but missing" in problems
    assert "val-000001.tar: shard file not listed in index.json" in problems
    assert "train-000000.tar: holds 2 samples, index.json says 3" in problems
    assert "split val: index.json says 5 samples" in problems


def test_forbidden_members_and_metadata(tmp_path):
    layout = {
        "train-000000.tar": ("train", [
            _sample("a-0", "p-a", extra_members={"pth": b"\x80\x04N."}),
            _sample("a-1", "p-a", extra_meta={"PatientName": "Doe^Jane"}),
        ]),
        "val-000000.tar": ("train", [_sample("c-0", "p-c")]),  # wrong split inside val shard
    }
    make_folder(tmp_path, layout)
    problems = "\n".join(verify_shards(tmp_path))
    assert "train-000000.tar: member 'a-0.pth' is not one of img.png, json, cls" in problems
    assert "train-000000.tar: sample a-1 json has keys outside the allow-list: ['PatientName']" \
        in problems
    assert "val-000000.tar: listed as split 'train' but named for another split" in problems


def test_missing_dir_or_index_is_a_user_error(tmp_path):
    with pytest.raises(MedsslError, match="no such shard folder"):
        verify_shards(tmp_path / "nope")
    with pytest.raises(MedsslError, match="index.json: missing"):
        verify_shards(tmp_path)
    assert main(["shards", "verify", str(tmp_path)]) == 2
