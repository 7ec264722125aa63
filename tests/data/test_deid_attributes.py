"""Canaries for subgroup attributes: exact ages, birth dates, institution and station names never
reach a shard member, index.json, the report, the logs or the shard journal, through both paths
(recipe columns, DICOM `--attributes`); refusals come before any shard is written."""

from __future__ import annotations

import csv
import io
import json
import re
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import ImplicitVRLittleEndian

from medssl.cli import main
from medssl.data import journal as journal_mod
from medssl.data.deid import Pseudonymizer
from medssl.data.shards import iter_samples, list_shards, read_index
from medssl.data.verify import verify_shards

CANARY = "CANARYzq"
SALT = bytes(range(32))
HOSPITALS = [f"{CANARY} General Hospital", f"{CANARY} St Mary's", f"{CANARY} Royal Infirmary"]
# Fractional ages: strings that cannot turn up by chance in a hash or a count.
AGES = ["17.25", "18.5", "39.75", "95.5", "61.125", "not recorded", "", "44.0625"]


@pytest.fixture
def salt(tmp_path) -> Path:
    path = tmp_path / "s.salt"
    path.write_bytes(SALT)
    return path


def _png(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 4000, (16, 16)).astype(np.uint16)
    Image.fromarray(pixels).save(path)


def _manifest(folder: Path, rows: int = 16, extra: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(rows):
        _png(folder / f"img{i:02d}.png", i)
        row = {"path": f"img{i:02d}.png", "pid": f"{CANARY}-P{i // 2}", "Sex": "FM"[i % 2],
               "Age": AGES[i % len(AGES)], "View": ["Frontal", "Lateral"][i % 2],
               "Site": HOSPITALS[(i // 2) % 3]}
        for column, values in (extra or {}).items():
            row[column] = values[i]
        lines.append(row)
    with open(folder / "m.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(lines[0]))
        writer.writeheader()
        writer.writerows(lines)
    return folder


def _recipe(tmp_path: Path, **attributes) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "name": "canary", "manifest": "m.csv", "image_column": "path", "patient_column": "pid",
        "attributes": attributes or {"sex": "Sex", "age": {"column": "Age", "bins": [0, 18, 40, 60, 80]},
                                     "view": "View", "site": {"column": "Site", "pseudonym": True}}}))
    return path


def _everything(out: Path, report: Path, logs: str) -> str:
    """The text of every shard member, index.json, the kept journal, the report and the logs."""
    parts = [logs, report.read_text()]
    for path in sorted(out.iterdir()):
        if path.suffix == ".tar":
            with tarfile.open(path) as tar:
                for m in tar:
                    data = tar.extractfile(m).read()
                    # A PNG's pixels are binary: any 4 digits turn up in them by chance. Its
                    # text chunks are where a name or date could hide.
                    parts.append(m.name + (repr(Image.open(io.BytesIO(data)).info)
                                           if m.name.endswith(".png") else data.decode("latin-1")))
        elif path.is_file():
            parts.append(path.read_text(errors="replace"))
    # Digests and pseudonyms are hex: drop the runs with a letter, so that a year such as 1974
    # is only found where it was written as a number.
    return re.sub(r"(?=[0-9a-f]*[a-f])[0-9a-f]{8,}", "", "\n".join(parts))


def _keep_journal(monkeypatch):
    close = journal_mod.Journal.close
    monkeypatch.setattr(journal_mod.Journal, "close", lambda self, delete=False: close(self, False))


def test_recipe_attributes_reach_shards_coarsened_only(tmp_path, salt, monkeypatch, capfd, caplog):
    _keep_journal(monkeypatch)
    data = _manifest(tmp_path / "data")
    out = tmp_path / "shards"
    caplog.set_level("DEBUG")
    assert main(["shard", str(data), "--out", str(out), "--recipe", str(_recipe(tmp_path)),
                 "--salt-file", str(salt), "--splits", "train=0.5,val=0.25,test=0.25"]) == 0
    assert (out / ".progress.jsonl").is_file()  # kept, so the journal is checked too
    report = tmp_path / "shards.report.jsonl"
    text = _everything(out, report, capfd.readouterr().err + caplog.text)
    for needle in [CANARY, "General", "Mary", "Infirmary", "not recorded",
                   *[a for a in AGES if a]]:
        assert needle.lower() not in text.lower(), needle

    pseudo = Pseudonymizer(SALT)
    sites = {pseudo.site(h) for h in HOSPITALS}
    samples = list(iter_samples(list_shards(out)))
    assert len(samples) == 16
    by_row = {}
    for s in samples:
        assert set(s.attributes) <= {"sex", "age", "site"} and s.view in ("FRONTAL", "LATERAL")
        assert s.attributes["site"] in sites and s.attributes["sex"] in ("F", "M")
        by_row.setdefault(s.attributes.get("age"), []).append(s)
    # 17.25 -> 0-17 and 18.5 -> 18-39 (the edge); 95.5 -> 80+ (Safe Harbor); 2 of 8 unusable.
    assert {k: len(v) for k, v in by_row.items()} == {"0-17": 2, "18-39": 4, "40-59": 2,
                                                      "60-79": 2, "80+": 2, None: 4}
    index = read_index(out)
    age = index["attributes"]["age"]
    assert list(age["values"]) == ["0-17", "18-39", "40-59", "60-79", "80+"]
    assert age["absent"] == 4 and age["from"] == "column" and age["bins"] == [0, 18, 40, 60, 80]
    assert sum(b["absent"] for b in age["splits"].values()) == 4
    assert sum(sum(b["values"].values()) for b in age["splits"].values()) == 12
    assert set(index["attributes"]["site"]["values"]) == sites
    assert index["attributes"]["view"]["values"] == {"FRONTAL": 8, "LATERAL": 8}
    assert index["config"]["attributes"]["site"] == {"from": "column", "column": "Site",
                                                     "pseudonym": True}
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    assert sum(line.get("attributes_absent", {}).get("age", 0) for line in lines) == 4
    assert verify_shards(out) == []


def test_dicom_header_attributes_only_when_asked(tmp_path, salt, monkeypatch, capfd, caplog):
    _keep_journal(monkeypatch)
    scans = tmp_path / "scans"
    scans.mkdir()
    headers = [  # (PatientSex, PatientAge, birth date, study date)
        ("F", "073Y", "19010101", "19740303"),   # PatientAge wins: 73 -> 60-79
        ("M", "", "19010101", "19190202"),       # from dates: 18 years -> 18-39
        ("M", "", "19010102", "19190101"),       # a day short of 18 -> 0-17
        ("X", "095Y", "", ""),                   # 95 -> 80+; sex X is not M/F/O
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, (sex, age, birth, study) in enumerate(headers):
            ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
            ds.PatientID, ds.PatientName = f"{CANARY}-{i}", f"{CANARY}^{i}"
            ds.PatientSex, ds.PatientAge = sex, age
            ds.PatientBirthDate, ds.StudyDate = birth, study
            ds.InstitutionName, ds.StationName = f"{CANARY} Clinic", f"{CANARY}STN{i % 2}"
            ds.Manufacturer, ds.ManufacturerModelName = "GE MEDICAL SYSTEMS", "Discovery<CT750>"
            ds.SOPInstanceUID = f"1.2.3.4.{i}"
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            ds.save_as(scans / f"s{i}.dcm", enforce_file_format=True)

    plain = tmp_path / "plain"
    assert main(["shard", str(scans), "--out", str(plain), "--salt-file", str(salt)]) == 0
    assert all(not s.attributes for s in iter_samples(list_shards(plain)))
    assert "attributes" not in read_index(plain)

    out = tmp_path / "shards"
    caplog.set_level("DEBUG")
    assert main(["shard", str(scans), "--out", str(out), "--salt-file", str(salt),
                 "--attributes", "sex,age,site,scanner"]) == 0
    text = _everything(out, tmp_path / "shards.report.jsonl", capfd.readouterr().err + caplog.text)
    for needle in [CANARY, "Clinic", "STN", "19010101", "1901", "1974", "1919", "073Y", "095Y"]:
        assert needle.lower() not in text.lower(), needle
    pseudo = Pseudonymizer(SALT)
    got = sorted((s.attributes.get("sex", "-"), s.attributes.get("age"), s.attributes["site"])
                 for s in iter_samples(list_shards(out)))
    site = [pseudo.site(f"{CANARY} Clinic", f"{CANARY}STN{k}") for k in (0, 1)]
    assert got == sorted([("F", "60-79", site[0]), ("M", "18-39", site[1]), ("M", "0-17", site[0]),
                          ("-", "80+", site[1])])
    sample = next(iter_samples(list_shards(out)))
    assert sample.attributes["manufacturer"] == "GE MEDICAL SYSTEMS"
    assert sample.attributes["model"] == "DiscoveryCT750"
    index = read_index(out)
    assert index["attributes"]["sex"]["absent"] == 1
    assert index["attributes"]["age"]["values"] == {"0-17": 1, "18-39": 1, "60-79": 1, "80+": 1}
    assert index["config"]["attributes"]["site"] == {"from": "header"}
    assert verify_shards(out) == []


def test_unknown_attribute_name_is_one_line_before_any_work(tmp_path, salt, capfd):
    data = _manifest(tmp_path / "data", rows=2)
    out = tmp_path / "shards"
    assert main(["shard", str(data), "--out", str(out), "--salt-file", str(salt),
                 "--attributes", "sex,birthdate"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown attribute 'birthdate'; valid: sex, age, site, scanner" in err[0]
    assert not out.exists()


def test_column_with_more_than_50_values_is_refused_before_any_shard(tmp_path, salt, capfd):
    comments = [f"{CANARY} note {i}" for i in range(60)]
    data = _manifest(tmp_path / "data", rows=60, extra={"Comment": comments})
    out = tmp_path / "shards"
    recipe = _recipe(tmp_path, model="Comment")
    assert main(["shard", str(data), "--out", str(out), "--recipe", str(recipe),
                 "--salt-file", str(salt)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "m.csv: column 'Comment'" in err[0] and "attributes.model" in err[0]
    assert "has 60 distinct values, more than 50" in err[0] and CANARY not in err[0]
    assert not out.exists() and not (tmp_path / "shards.salt").exists()


def test_plain_site_names_are_refused_unquoted(tmp_path, salt, capfd):
    data = _manifest(tmp_path / "data", rows=4)
    out = tmp_path / "shards"
    assert main(["shard", str(data), "--out", str(out), "--salt-file", str(salt),
                 "--recipe", str(_recipe(tmp_path, site="Site"))]) == 2
    err = capfd.readouterr().err
    assert "column 'Site': site value is not a short code" in err and "pseudonym: true" in err
    assert CANARY not in err and not out.exists()


def test_verify_flags_attribute_keys_outside_the_allow_list(tmp_path, salt):
    data = _manifest(tmp_path / "data", rows=4)
    out = tmp_path / "shards"
    assert main(["shard", str(data), "--out", str(out), "--recipe", str(_recipe(tmp_path)),
                 "--salt-file", str(salt)]) == 0
    assert verify_shards(out) == []
    # Rewrite one shard with a raw age and a birth date slipped into `attributes`.
    shard = min(out.glob("*.tar"))
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    bad = shard.with_suffix(".new")
    with tarfile.open(bad, "w") as tar:
        for m, raw in members:
            if m.name.endswith(".json"):
                meta = json.loads(raw)
                meta["attributes"].update(age="47", birth_date="19010101")
                raw = json.dumps(meta).encode()
                m.size = len(raw)
            tar.addfile(m, io.BytesIO(raw))
    bad.replace(shard)
    problems = "\n".join(verify_shards(out))
    assert "attribute 'birth_date' is not one of sex, age, site, manufacturer, model" in problems
    assert "attribute 'age' is not an age band" in problems
