"""Shards are checked against index.json before step 1: a missing, truncated, damaged or
miscounted shard is refused by name before the run dir exists; a big batch is warned about once."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from conftest import run_cli, snapshot

from medssl.errors import MedsslError
from medssl.rundir import read_record
from pretrain import shardcheck
from pretrain.shardcheck import check_shards, read_cache
from pretrain.tarcount import TarDamaged, count_samples


def _args(shards: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.shards={shards}", f"output_dir={out}", "train.max_steps=2", *extra]


def _index(shards: Path) -> dict:
    return json.loads((shards / "index.json").read_text())


def _refused(capsys, shards: Path, out: Path, *extra: str) -> str:
    before = snapshot(shards)
    code, errors, err = run_cli(capsys, *_args(shards, out, *extra))
    assert code == 2 and len(errors) == 1, err
    assert not out.exists(), "refused before the run dir was created"
    assert snapshot(shards) == before
    return errors[0]


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_deleted_shard_is_refused_by_name(tmp_path, make_shards, capsys):
    shards = make_shards(tmp_path / "shards")
    (shards / "train-000003.tar").unlink()
    message = _refused(capsys, shards, tmp_path / "run")
    assert "train-000003.tar: listed in index.json but missing" in message


def test_wrong_count_in_index_json_is_refused_by_name(tmp_path, make_shards, capsys):
    shards = make_shards(tmp_path / "shards")
    index = _index(shards)
    index["shards"]["train-000005.tar"]["samples"] = 15
    (shards / "index.json").write_text(json.dumps(index))
    message = _refused(capsys, shards, tmp_path / "run")
    assert "train-000005.tar: holds 16 samples, index.json says 15" in message


def test_wrong_split_total_is_refused(tmp_path, make_shards, capsys):
    shards = make_shards(tmp_path / "shards")
    index = _index(shards)
    index["splits"]["train"]["samples"] = 200
    (shards / "index.json").write_text(json.dumps(index))
    assert "split 'train' says 200 samples, its shards list 128" in _refused(capsys, shards, tmp_path / "run")


def test_truncated_shard_and_wrong_size_are_refused(tmp_path, make_shards, capsys):
    shards = make_shards(tmp_path / "shards")
    tar = shards / "train-000002.tar"
    os.truncate(tar, tar.stat().st_size // 2)
    message = _refused(capsys, shards, tmp_path / "run")
    assert "train-000002.tar:" in message and "truncated" in message

    shards = make_shards(tmp_path / "sized")
    index = _index(shards)
    for name, info in index["shards"].items():   # the index.json of the ingestion side
        info["bytes"] = (shards / name).stat().st_size
    index["shards"]["train-000001.tar"]["bytes"] += 512
    (shards / "index.json").write_text(json.dumps(index))
    message = _refused(capsys, shards, tmp_path / "run2")
    assert "train-000001.tar:" in message and "index.json says" in message


def test_flipped_byte_is_refused_by_a_header_check_or_a_full_check(tmp_path, make_shards, capsys):
    shards = make_shards(tmp_path / "shards")
    _flip(shards / "train-000004.tar", 100)        # inside the first member header
    assert "train-000004.tar: tar header at byte 0 fails its checksum" in _refused(
        capsys, shards, tmp_path / "run")

    shards = make_shards(tmp_path / "image_byte")
    tar = shards / "train-000006.tar"
    with tarfile.open(tar) as t:
        inside_image = t.getmembers()[-1].offset_data + 7
    _flip(tar, inside_image)                        # in a member's data: headers intact
    assert count_samples(tar) == 16                # quick cannot see it ...
    message = _refused(capsys, shards, tmp_path / "run2", "data.verify=full")
    assert "train-000006.tar: sha256 differs from index.json" in message   # ... full does


def test_glob_with_an_unlisted_shard_is_refused(tmp_path, make_shards):
    shards = make_shards(tmp_path / "shards", n_shards=2)
    (shards / "train-000009.tar").write_bytes((shards / "train-000000.tar").read_bytes())
    urls = sorted(str(p) for p in shards.glob("train-*.tar"))
    with pytest.raises(MedsslError, match=r"train-000009.tar: not listed in .*index.json"):
        check_shards(urls, str(shards / "train-*.tar"), "train", "quick")


def test_report_records_provenance_and_the_cache_spares_a_resume_the_reading(
        tmp_path, make_shards, capsys, monkeypatch):
    shards = make_shards(tmp_path / "shards")
    index = _index(shards)
    index["config"]["salt_id"] = "5a1t1d"
    (shards / "index.json").write_text(json.dumps(index))
    out = tmp_path / "run"
    assert run_cli(capsys, *_args(shards, out, "data.verify=full"))[0] == 0
    (source,) = read_record(out).data
    assert (source.folder, source.split, source.salt_id, source.shards, source.samples) == (
        str(shards.resolve()), "train", "5a1t1d", 8, 128)
    cached = read_cache(out)
    assert len(cached) == 8 and all(c["samples"] == 16 and len(c["sha256"]) == 64 for c in cached.values())

    reads: list[str] = []
    count, digest = shardcheck.count_or_reason, shardcheck.sha256_file
    monkeypatch.setattr(shardcheck, "count_or_reason", lambda p: reads.append(Path(p).name) or count(p))
    monkeypatch.setattr(shardcheck, "sha256_file", lambda p: reads.append(Path(p).name) or digest(p))
    code, _, err = run_cli(capsys, *_args(shards, out, "train.max_steps=3", "data.verify=full"))
    assert code == 0 and reads == [], err          # the cache vouched for every shard
    os.utime(shards / "train-000000.tar", ns=(1, 1))
    code, _, err = run_cli(capsys, *_args(shards, out, "train.max_steps=4", "data.verify=full"))
    assert code == 0 and reads == ["train-000000.tar", "train-000000.tar"], err   # changed: read again


def test_count_samples_matches_tarfile_on_long_names_and_refuses_damage(tmp_path):
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        path = tmp_path / f"fmt{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for i in range(5):
                for ext in ("img.png", "json"):
                    stem = ("d/" * 40 + "k") if fmt != tarfile.USTAR_FORMAT else "k"
                    info = tarfile.TarInfo(f"{stem}{i}.{ext}")
                    info.size = 700
                    tar.addfile(info, io.BytesIO(bytes(700)))
        assert count_samples(path) == 5, fmt
    data = path.read_bytes()
    path.write_bytes(data[:512 + 300])
    with pytest.raises(TarDamaged, match="truncated"):
        count_samples(path)


def test_batch_larger_than_the_split_is_warned_once(tmp_path, make_shards, capsys):
    shards = make_shards(tmp_path / "small", n_shards=1, per_shard=6)
    code, _, err = run_cli(capsys, *_args(shards, tmp_path / "run", "train.max_steps=3"))
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "larger than the 6 samples" in line]
    assert len(warnings) == 1 and "train.batch_size 16" in warnings[0]


def test_many_shards_are_counted_in_a_process_pool(tmp_path, make_shards):
    shards = make_shards(tmp_path / "many", n_shards=shardcheck._POOL_FROM + 6, per_shard=2, size=8)
    urls = sorted(str(p) for p in shards.glob("train-*.tar"))
    report = check_shards(urls, str(shards), "train", "quick", workers=2)
    assert report.samples == 2 * len(urls) and all(f["samples"] == 2 for f in report.cache.values())
    os.truncate(urls[41], 1024)
    with pytest.raises(MedsslError, match=r"train-000041.tar: .*truncated"):
        check_shards(urls, str(shards), "train", "quick", workers=2)
