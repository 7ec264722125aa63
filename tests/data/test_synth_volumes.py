"""`medssl synth --volumes`: whole series per patient, volumes.csv, labeled volume shards."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medssl.cli import main
from medssl.data.shards import read_index
from medssl.data.synth import canary_strings, draw_patient
from medssl.data.synth_volumes import VOLUME_COLUMNS, write_volume_corpus
from medssl.data.verify import verify_shards

PATIENTS, SLICES, SIZE, SEED = 5, 6, 32, 3
RECIPE = Path(__file__).resolve().parents[2] / "datasets" / "recipes" / "demo_volumes.yaml"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthvol") / "corpus"
    assert main(["synth", str(out), "--volumes", "--patients", str(PATIENTS), "--slices",
                 str(SLICES), "--size", str(SIZE), "--seed", str(SEED)]) == 0
    return out


def rows(out: Path) -> list[dict]:
    with (out / "volumes.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_one_series_folder_per_patient_with_volume_labels(corpus, tmp_path):
    table = rows(corpus)
    assert list(table[0]) == list(VOLUME_COLUMNS) and len(table) == PATIENTS
    for p, row in enumerate(table):
        files = sorted((corpus / row["path"]).glob("*.dcm"))
        assert len(files) == SLICES
        z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
             for f in files]
        assert np.allclose(np.diff(z), -160.0 / SLICES, atol=1e-3)  # one step, cranial first
        vol = draw_patient(p, SEED, SLICES, SIZE)
        assert int(row["effusion"]) == int(vol.effusion.any())
        assert int(row["finding"]) == int(vol.nodule.any()) + 2 * int(vol.effusion.any())
    again = tmp_path / "again"
    write_volume_corpus(again, patients=PATIENTS, slices=SLICES, size=SIZE, seed=SEED)
    assert {p.relative_to(again): p.read_bytes() for p in again.rglob("*") if p.is_file()} == \
        {p.relative_to(corpus): p.read_bytes() for p in corpus.rglob("*") if p.is_file()}
    write_volume_corpus(again, patients=2, slices=SLICES, size=SIZE, seed=SEED)  # replaces it
    assert len(rows(again)) == 2 and len(list(again.glob("PAT-*"))) == 2


def test_recipe_gives_labeled_volume_shards(corpus, tmp_path, salt):
    out = tmp_path / "shards"
    assert main(["shard", str(corpus), "--out", str(out), "--volumes", "--spacing", "12,12,8",
                 "--recipe", str(RECIPE), "--salt-file", str(salt)]) == 0
    index = read_index(out)
    assert index["labels"] == {"type": "binary", "names": ["no_effusion", "effusion"]}
    assert index["config"]["volumes"] is True and index["config"]["spacing"] == [12.0, 12.0, 8.0]
    assert verify_shards(out) == []
    labels, cls, blob = {}, {}, b""
    for path in sorted(out.glob("*.tar")):
        blob += path.read_bytes()
        with tarfile.open(path) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                data = tar.extractfile(m).read()
                if ext == "json":
                    meta = json.loads(data)
                    labels[key] = meta["label"]
                    assert meta["spacing"] == [12.0, 12.0, 8.0] and meta["attributes"]["site"]
                elif ext == "cls":
                    cls[key] = int(data)
    assert cls == labels
    assert sorted(labels.values()) == sorted(int(r["effusion"]) for r in rows(corpus))
    for p in range(PATIENTS):
        for canary in canary_strings(p, SEED, SLICES, SIZE):
            assert canary.encode() not in blob, canary
