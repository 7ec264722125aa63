"""Synthetic demo corpus: deterministic, real CT DICOM, canaries present, labels match pixels."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from medssl.cli import main
from medssl.data.synth import (
    CANARY_FIELDS,
    LABEL_COLUMNS,
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    canary_strings,
    draw_patient,
    fake_identity,
    write_corpus,
)
from medssl.errors import MedsslError

PATIENTS, SLICES, SIZE = 3, 4, 64


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "corpus"
    write_corpus(out, patients=PATIENTS, slices=SLICES, size=SIZE, seed=7)
    return out


def _rows(out: Path) -> list[dict]:
    with (out / "labels.csv").open() as fh:
        return list(csv.DictReader(fh))


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_same_arguments_give_byte_identical_corpus(corpus, tmp_path):
    again = tmp_path / "again"
    write_corpus(again, patients=PATIENTS, slices=SLICES, size=SIZE, seed=7)
    first, second = _files(corpus), _files(again)
    masks = sum(1 for r in _rows(corpus) if r["mask"])
    assert 0 < masks < PATIENTS * SLICES
    assert len(first) == PATIENTS * SLICES + 1 + masks  # slices, labels.csv, finding masks
    assert first == second
    other = tmp_path / "other"
    write_corpus(other, patients=PATIENTS, slices=SLICES, size=SIZE, seed=8)
    third = _files(other)
    assert set(third) != set(first)  # names, dates, UIDs all come from the seed
    assert not set(first.values()) & set(third.values())


def test_files_are_ct_dicom_with_signed_pixels_and_a_rescale(corpus):
    rows = _rows(corpus)
    assert len(rows) == PATIENTS * SLICES and list(rows[0]) == list(LABEL_COLUMNS)
    sop_uids = set()
    for row in rows:
        path = corpus / row["path"]
        raw = path.read_bytes()
        assert raw[128:132] == b"DICM"  # Part 10 file: preamble + prefix + file meta
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == CTImageStorage == ds.SOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == "CT" and ds.BodyPartExamined == "CHEST"
        assert ds.PixelRepresentation == 1 and ds.BitsAllocated == 16 and ds.BitsStored in (12, 16)
        assert float(ds.RescaleSlope) == 1 and float(ds.RescaleIntercept) != 0
        assert (ds.Rows, ds.Columns) == (SIZE, SIZE)
        assert float(ds.WindowWidth) > 0 and len(ds.PixelSpacing) == 2
        assert float(ds.SliceThickness) > 0 and len(ds.ImagePositionPatient) == 3
        stored = ds.pixel_array
        assert stored.dtype == np.int16
        hu = stored.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert not np.array_equal(hu, stored)  # a reader that skips the modality LUT is wrong
        assert hu.min() >= -1024 and hu.max() <= 3071
        assert int(ds.InstanceNumber) - 1 == int(row["slice"])
        assert ds.PatientID == row["patient_id"]
        sop_uids.add(ds.SOPInstanceUID)
    assert len(sop_uids) == len(rows)
    # Slices of a series are ordered cranio-caudally along z.
    zs = [float(pydicom.dcmread(corpus / r["path"]).ImagePositionPatient[2]) for r in rows[:SLICES]]
    assert zs == sorted(zs, reverse=True)


def test_every_canary_is_really_written(corpus):
    rows = _rows(corpus)
    for p in range(PATIENTS):
        ident = fake_identity(p, seed=7, slices=SLICES, size=SIZE)
        mine = [r for r in rows if r["patient_id"] == ident.patient_id]
        assert len(mine) == SLICES
        blob = b"".join((corpus / r["path"]).read_bytes() for r in mine)
        paths = " ".join(r["path"] for r in mine)
        ds = pydicom.dcmread(corpus / mine[0]["path"])
        for keyword in CANARY_FIELDS:
            assert str(ds.data_element(keyword).value).strip(), keyword
        assert ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)[0x10].value == ident.private_name
        canaries = canary_strings(p, seed=7, slices=SLICES, size=SIZE)
        assert len(canaries) > 20 and all(len(c) >= 6 for c in canaries)
        iso = {f"{d[:4]}-{d[4:6]}-{d[6:]}" for d in (ident.birth_date, ident.study_date)}
        assert iso <= set(canaries)  # ISO dates are for searching outputs; DICOM writes YYYYMMDD
        for canary in set(canaries) - iso:
            assert canary.encode() in blob or canary in paths, canary
        # Patient folders are named after the fake patient on purpose: a path leak is caught.
        assert mine[0]["path"].startswith(f"PAT-{ident.patient_name.split('^')[0]}")
    ids = {fake_identity(p, 7).patient_id for p in range(50)}
    assert len(ids) == 50


def test_tissue_intensities_are_ct_like():
    ph = draw_patient(0, seed=3, slices=6, size=96)
    hu = ph.hu.astype(np.float32) - ph.offset_hu  # tissue as it is, before the site's offset
    corner = hu[:, :6, :6]
    assert -1030 < corner.mean() < -970  # air outside the body
    lung = hu[ph.lung_mask]
    assert -900 < np.median(lung) < -700
    assert hu.max() > 700  # cortical bone of the vertebra / ribs
    center_row = hu[:, int(0.5 * 96), :]
    body = center_row[center_row > -300]
    soft = body[(body > -200) & (body < 200)]
    assert soft.size > 0 and -120 < np.median(soft) < 80
    # Correlated grain: neighbouring air pixels are far from independent.
    air = hu[:, :20, :20] - hu[:, :20, :20].mean()
    corr = (air[:, :, 1:] * air[:, :, :-1]).mean() / air.var()
    assert 0.2 < corr < 0.95


def test_labels_match_the_findings_in_the_pixels(corpus):
    rows = _rows(corpus)
    for p in range(PATIENTS):
        ph = draw_patient(p, seed=7, slices=SLICES, size=SIZE)
        ident = fake_identity(p, seed=7, slices=SLICES, size=SIZE)
        mine = [r for r in rows if r["patient_id"] == ident.patient_id]
        for r in mine:
            k = int(r["slice"])
            ds = pydicom.dcmread(corpus / r["path"])
            hu = ds.pixel_array.astype(np.int32) + int(ds.RescaleIntercept)
            np.testing.assert_array_equal(hu, ph.hu[k])
            assert int(r["nodule"]) == ph.nodule[k] == ph.nodule_mask[k].any()
            assert int(r["effusion"]) == ph.effusion[k] == ph.effusion_mask[k].any()
            assert int(r["finding"]) == int(r["nodule"]) + 2 * int(r["effusion"])
    # Across many patients, the findings look like what they claim to be.
    nod_gap, eff_hu, nodule, effusion = [], [], [], []
    for p in range(16):
        ph = draw_patient(p, seed=1, slices=8, size=64)
        hu = ph.hu.astype(np.float32)
        nodule.append(ph.nodule)
        effusion.append(ph.effusion)
        for k in np.flatnonzero(ph.nodule):
            nod_gap.append(hu[k][ph.nodule_mask[k]].mean() - hu[k][ph.lung_mask[k]].mean())
        for k in np.flatnonzero(ph.effusion):
            eff_hu.append(hu[k][ph.effusion_mask[k]].mean() - ph.offset_hu)
            for half in (slice(0, 32), slice(32, 64)):  # one lung each side of the midline
                m = ph.effusion_mask[k][:, half]
                cols = m.any(axis=0)
                if cols.sum() < 3:
                    continue
                # A flat, dependent level: no aerated lung on this side reaches below the fluid's
                # top row (posterior = image bottom), and that row holds fluid in several columns.
                level = int(np.nonzero(m)[0].min())
                assert np.nonzero(ph.lung_mask[k][:, half])[0].max() < level
                assert m[level].sum() >= 2
    assert len(nod_gap) > 5 and min(nod_gap) > 400  # nodules are soft tissue inside aerated lung
    assert len(eff_hu) > 5 and all(-30 < v < 50 for v in eff_hu)
    prevalence_n, prevalence_e = np.mean(nodule), np.mean(effusion)
    assert 0.25 < prevalence_n < 0.65 and 0.25 < prevalence_e < 0.65
    both = np.mean(np.array(nodule) & np.array(effusion))
    assert 0.05 < both < 0.45  # all four `finding` classes occur


def test_patients_vary():
    phantoms = [draw_patient(p, seed=0, slices=4, size=64) for p in range(8)]
    body = [(ph.hu[1] > -500).sum() for ph in phantoms]
    lung = [ph.lung_mask[1].sum() for ph in phantoms]
    assert np.std(body) / np.mean(body) > 0.03 and np.std(lung) / np.mean(lung) > 0.03
    assert len({tuple(ph.nodule) + tuple(ph.effusion) for ph in phantoms}) > 3
    # Anatomy changes smoothly along the slices, but does change.
    ph = phantoms[0]
    lung_per_slice = ph.lung_mask.sum(axis=(1, 2))
    assert len(set(lung_per_slice.tolist())) > 1


def test_same_patient_and_findings_at_another_size():
    small, large = draw_patient(2, seed=0, slices=6, size=64), draw_patient(2, seed=0, slices=6, size=256)
    assert small.fov_mm == large.fov_mm
    agree = np.mean(np.r_[small.nodule == large.nodule, small.effusion == large.effusion])
    assert agree >= 0.75
    body_small = (small.hu > -500).mean()
    body_large = (large.hu > -500).mean()
    assert abs(body_small - body_large) < 0.02


def test_rerun_replaces_a_previous_corpus_but_refuses_other_folders(tmp_path):
    out = tmp_path / "c"
    write_corpus(out, patients=3, slices=2, size=32)
    write_corpus(out, patients=1, slices=2, size=32)  # fewer patients: no stale series left
    assert len(list(out.rglob("*.dcm"))) == 2 and len(_rows(out)) == 2
    assert {p.relative_to(out).as_posix() for p in out.rglob("*.mask.png")} == \
        {r["mask"] for r in _rows(out) if r["mask"]}  # no stale masks either
    # A corpus written before labels.csv had patient columns is still recognised as ours.
    old = tmp_path / "old"
    (old / "PAT-x").mkdir(parents=True)
    (old / "labels.csv").write_text("path,patient_id,slice,nodule,effusion,finding\n")
    write_corpus(old, patients=1, slices=1, size=32)
    assert not (old / "PAT-x").exists() and len(_rows(old)) == 1
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("precious")
    with pytest.raises(MedsslError, match="not empty"):
        write_corpus(other, patients=1, slices=1, size=32)
    with pytest.raises(MedsslError, match="--size"):
        write_corpus(tmp_path / "x", size=8)


def test_cli_synth_writes_the_corpus(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "cli"), "--patients", "2", "--slices", "3", "--size", "32",
                 "--seed", "5"]) == 0
    assert len(_rows(tmp_path / "cli")) == 6
    # The CLI sets up logging itself (force=True), so read its stream rather than caplog.
    assert "synth: wrote 2 patients x 3 slices" in capsys.readouterr().err
