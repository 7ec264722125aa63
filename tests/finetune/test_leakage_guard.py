"""Leakage guards of medssl finetune: split, patient and image level, refusal and allow_leakage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from finetune_data import set_salt, write_labeled_shards, write_patient_shards, write_ssl_published

from finetune.config import FinetuneRunConfig
from finetune.leakage_guard import preflight
from finetune.runner import finetune_command
from medssl.config import build
from medssl.errors import MedsslError
from medssl.leakage.patients import hash_sources, shard_patients

SALT = "5a1t0000beef"
#: write_labeled_shards puts patient p in test when p % 5 == 4: patients 4, 9, 14 of 15.
TEST_PATIENT = f"p-{4:016x}"


def _task(tmp_path: Path, salt: str | None = SALT) -> tuple[Path, str]:
    folder = write_labeled_shards(tmp_path / "task", kind="binary", patients=15, per_patient=2,
                                  size=16)
    digest = set_salt(folder, salt) if salt else None
    return folder, digest


def _source(split: str, digest: str, salt: str = SALT, samples: int = 10) -> dict:
    return {"split": split, "index_sha256": digest, "salt_id": salt, "shards": 1, "samples": samples}


def _cfg(tmp_path: Path, task: Path, published: Path, **evaluation) -> dict:
    return {"output_dir": str(tmp_path / "bench"), "model": {"arch": "test_efficientnet"},
            "inits": [f"ssl:{published}", "random"],
            "tasks": [{"name": "t", "kind": "shards", "path": str(task)}],
            "protocols": ["knn"], "label_fractions": [1.0], "seeds": [0], "input_size": 16,
            "knn": {"k": [3]}, "bootstrap": {"n": 20}, "device": "cpu",
            "evaluation": evaluation}


def _guard(tree: dict):
    return preflight(build(FinetuneRunConfig, tree))


def test_pretraining_on_the_test_split_makes_finetune_refuse_with_one_line(tmp_path):
    task, digest = _task(tmp_path)
    pub = write_ssl_published(tmp_path / "pub", [_source("test", digest)])
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(tmp_path, task, pub)))
    proc = subprocess.run([sys.executable, "-m", "medssl", "finetune", str(cfg)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "pretrained on this task's test split" in lines[0]
    assert "evaluation.allow_leakage: true" in lines[0]
    assert not (tmp_path / "bench").exists()          # refused before any work
    # a glob over several splits ("test+train") read the test split too; val refuses as well
    for split in ("test+train", "val"):
        pub2 = write_ssl_published(tmp_path / f"pub-{split}", [_source(split, digest)])
        with pytest.raises(MedsslError, match=f"{split.split('+')[0]} split"):
            _guard(_cfg(tmp_path, task, pub2))


def test_allow_leakage_goes_on_and_every_row_report_and_card_say_so(tmp_path):
    from medssl.card import _results
    from medssl.results import Results

    task, digest = _task(tmp_path)
    pub = write_ssl_published(tmp_path / "pub", [_source("test", digest)])
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(tmp_path, task, pub, allow_leakage=True)))
    assert finetune_command(cfg, []) == 0
    results = Results.read(tmp_path / "bench" / "results.json")
    ssl_rows = [r for r in results.rows if r.init.startswith("ssl:")]
    assert ssl_rows and all("read this task's test split" in r.leakage for r in ssl_rows)
    # the same shard folder and salt: its test patients were all read, and counted
    assert all("3 of 3 test patients (6 test images)" in r.leakage for r in ssl_rows)
    assert all(r.leakage == "" for r in results.rows if r.init == "random")
    record = results.tasks["t"]["leakage"]["inits"][0]
    assert record["split_level"]["leaked"] == ["test"]
    assert record["patient_level"]["test"] == {"seen": 3, "of": 3, "images": 6}
    report = (tmp_path / "bench" / "report.md").read_text()
    assert "Benchmarked anyway (evaluation.allow_leakage)" in report
    assert "not held-out estimates" in report
    card = _results(results)
    assert "† **Leakage:**" in card and "| t † | ssl:pub |" in card
    assert str(tmp_path) not in card


def test_a_shared_salt_test_patient_is_counted_and_refused(tmp_path):
    task, digest = _task(tmp_path)
    # Another corpus of the same site (same salt): one of the task's test patients, with two
    # images of their own, not the task's images; and two patients the task never saw.
    other = write_patient_shards(tmp_path / "other",
                                 {TEST_PATIENT: 2, "p-aaaaaaaaaaaaaaaa": 3, "p-bbbbbbbbbbbbbbbb": 1},
                                 SALT)
    other_digest = set_salt(other, SALT)
    source = _source("train", other_digest)
    pseudonyms = set().union(*(set(c) for c in shard_patients(other, ["train"]).values()))
    hashes = hash_sources("ab" * 16, [(other_digest, SALT, "train", pseudonyms)])
    pub = write_ssl_published(tmp_path / "pub", [source], patient_hashes=hashes)
    with pytest.raises(MedsslError) as info:
        _guard(_cfg(tmp_path, task, pub))
    assert "1 of 3 test patients (2 test images)" in str(info.value)
    assert "\n" not in str(info.value)
    # allowed: the finding is recorded with its numbers
    guard = _guard(_cfg(tmp_path, task, pub, allow_leakage=True))
    (finding,) = guard.findings.values()
    assert finding.split_level["status"] == "other corpus"
    assert finding.patient_level["test"] == {"seen": 1, "of": 3, "images": 2}
    assert finding.patient_level["via"] == ["the published dir's patient hashes"]
    # weights without hashes: the pretraining shards give the same count ...
    bare = write_ssl_published(tmp_path / "bare", [source])
    with pytest.raises(MedsslError, match="1 of 3 test patients"):
        _guard(_cfg(tmp_path, task, bare, pretraining_shards=[str(other)]))
    # ... and with neither, the overlap cannot be checked: refused, saying what to give
    with pytest.raises(MedsslError, match="cannot be checked.*evaluation.pretraining_shards"):
        _guard(_cfg(tmp_path, task, bare))
    # another salt: no patient in common is possible, nothing to refuse
    task2 = write_labeled_shards(tmp_path / "task2", kind="binary", patients=15, per_patient=2,
                                 size=16)
    set_salt(task2, "0ther5a1t000")
    guard = _guard(_cfg(tmp_path, task2, pub))
    assert next(iter(guard.findings.values())).patient_level["status"] == "not applicable"


def test_pretraining_on_the_train_split_of_the_task_folder_passes(tmp_path):
    task, digest = _task(tmp_path)
    pub = write_ssl_published(tmp_path / "pub", [_source("train", digest)])
    guard = _guard(_cfg(tmp_path, task, pub))
    (finding,) = guard.findings.values()
    assert finding.split_level == {"status": "same corpus", "index_sha256": digest,
                                   "read": ["train"], "leaked": []}
    # the task folder is the pretraining folder: its train patients are read from it directly
    assert finding.patient_level["test"]["seen"] == 0
    assert finding.patient_level["via"] == ["the pretraining shards"]
    assert finding.refusal is None and finding.note == ""


def test_pretraining_shards_must_be_what_pretraining_read(tmp_path):
    task, digest = _task(tmp_path)
    stranger = write_patient_shards(tmp_path / "stranger", {"p-cccccccccccccccc": 1}, SALT)
    pub = write_ssl_published(tmp_path / "pub", [_source("train", "f" * 64)])
    with pytest.raises(MedsslError, match="pretraining_shards.*not a shard folder any ssl init"):
        _guard(_cfg(tmp_path, task, pub, pretraining_shards=[str(stranger)]))
    with pytest.raises(MedsslError, match="leakage_check.*not reachable"):
        _guard(_cfg(tmp_path, task, pub, leakage_check=True))


def test_leakage_check_is_recorded_per_task_and_read_back(tmp_path, monkeypatch):
    task, digest = _task(tmp_path)
    pub = write_ssl_published(tmp_path / "pub", [_source("train", digest)])
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(tmp_path, task, pub, leakage_check=True)))
    assert finetune_command(cfg, []) == 0
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    image = results["tasks"]["t"]["leakage"]["inits"][0]["image_level"]
    (entry,) = image["folders"]
    assert image["status"] == "checked"
    assert entry["pretraining_splits"] == ["train"] and entry["task_splits"] == ["test", "val"]
    assert entry["pretrain_samples"] == 18 and entry["task_samples"] == {"test": 6, "val": 6}
    assert (tmp_path / "bench" / entry["report"]).is_file()
    assert "p-" not in json.dumps(results["tasks"])      # no sample key reaches results.json
    assert "Near-duplicate images" in (tmp_path / "bench" / "report.md").read_text()

    def no_rehash(*args, **kwargs):
        raise AssertionError("a resumed run must read the recorded check back")

    monkeypatch.setattr("medssl.leakage.hash_folder", no_rehash)
    assert finetune_command(cfg, []) == 0
    again = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert again["tasks"]["t"]["leakage"] == results["tasks"]["t"]["leakage"]
