"""Synthetic sites: scanners differ as documented, findings do not, patients carry sex/age/site."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from medssl.data.synth import (
    LABEL_COLUMNS,
    _draw_patient,
    canary_strings,
    draw_patient,
    fake_identity,
    write_corpus,
)
from medssl.data.synth_sites import SCANNERS, ScanSettings, scan_settings, site_of, sites

PATIENTS, SLICES, SIZE, SEED = 6, 4, 64, 11


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sites") / "corpus"
    write_corpus(out, patients=PATIENTS, slices=SLICES, size=SIZE, seed=SEED)
    return out


def _rows(out: Path) -> list[dict]:
    with (out / "labels.csv").open() as fh:
        return list(csv.DictReader(fh))


def _air(hu: np.ndarray) -> np.ndarray:
    """The top 1/16 of the rows: air above the body at every site's field of view."""
    return hu[:, : hu.shape[1] // 16, :].astype(np.float32)


def test_sites_differ_in_grain_offset_and_field_of_view_as_documented():
    measured = {s: {"std": [], "mean": [], "fov": [], "body": []} for s in range(3)}
    for p in range(18):
        ph = draw_patient(p, seed=0, slices=4, size=64)
        air = _air(ph.hu)
        m = measured[ph.site]
        m["std"].append(air.std(axis=(1, 2)).mean())
        m["mean"].append(air.mean())
        m["fov"].append(ph.fov_mm)
        m["body"].append((ph.hu > -500).mean())
    bodies = []
    for site, m in measured.items():
        scanner = SCANNERS[site]
        assert len(m["std"]) == 6  # six patients per site: blocks of three, one site each
        assert abs(np.mean(m["std"]) / scanner.noise_hu - 1) < 0.15, (site, np.mean(m["std"]))
        assert abs(np.mean(m["mean"]) - (-1000 + scanner.offset_hu)) < 4, (site, np.mean(m["mean"]))
        assert all(abs(f - scanner.fov_mm) <= 10 for f in m["fov"])
        bodies.append(np.mean(m["body"]))
    # A wider field of view shows the same kind of patient smaller: (350/450)^2 = 0.6.
    assert bodies[0] > bodies[1] > bodies[2] and 0.45 < bodies[2] / bodies[0] < 0.75
    stds = [np.mean(measured[s]["std"]) for s in range(3)]
    assert stds[2] > 3 * stds[0]


def test_findings_are_the_patients_and_as_visible_at_every_site():
    """The same patient imaged by each site's scanner: nearly the same labels, and the
    weakest finding stays far above the site's grain."""
    agree, contrast = [], {s: [] for s in range(3)}
    prevalence = {s: [] for s in range(3)}
    for p in range(30):
        per_site = []
        for site, scanner in enumerate(SCANNERS):
            ph = _draw_patient(np.random.default_rng([0, p, 2]), np.random.default_rng([0, p, 3]),
                               4, 64, ScanSettings(site, scanner.noise_hu, scanner.offset_hu,
                                                   scanner.fov_mm))
            per_site.append(np.r_[ph.nodule, ph.effusion])
            prevalence[site].append(per_site[-1].mean())
            hu = ph.hu.astype(np.float32)
            for k in np.flatnonzero(ph.nodule | ph.effusion):
                inside = hu[k][ph.nodule_mask[k] | ph.effusion_mask[k]].mean()
                contrast[site].append((inside - hu[k][ph.lung_mask[k]].mean()) / ph.noise_hu)
        agree += [np.mean(per_site[s] == per_site[0]) for s in (1, 2)]
    assert np.mean(agree) > 0.85
    assert max(np.mean(v) for v in prevalence.values()) - min(np.mean(v) for v in prevalence.values()) < 0.1
    assert all(min(c) > 10 for c in contrast.values()), {s: min(c) for s, c in contrast.items()}


def test_sites_are_balanced_deterministic_and_named_from_the_seed():
    counts = np.bincount([site_of(p, 0) for p in range(24)], minlength=3)
    assert counts.tolist() == [8, 8, 8]
    assert len({tuple(site_of(p, 0) for p in range(3 * b, 3 * b + 3)) for b in range(8)}) > 1
    names = [s.institution for s in sites(0)]
    assert len(set(names)) == 3 and names == [s.institution for s in sites(0)]
    assert not set(names) & {s.institution for s in sites(1)}
    assert all(len(s.station) <= 16 for s in sites(0))  # StationName is VR SH
    assert scan_settings(5, 0) == scan_settings(5, 0)


def test_labels_csv_carries_sex_exact_age_and_site_as_the_dicom_does(corpus):
    rows = _rows(corpus)
    assert list(rows[0]) == list(LABEL_COLUMNS)
    assert list(LABEL_COLUMNS[:6]) == ["path", "patient_id", "slice", "nodule", "effusion", "finding"]
    by_site: dict[str, set] = {}
    for row in rows:
        ds = pydicom.dcmread(corpus / row["path"])
        assert row["sex"] in ("F", "M") and row["sex"] == ds.PatientSex
        assert re.fullmatch(r"\d+", row["age"]) and int(row["age"]) == int(ds.PatientAge[:-1])
        assert 18 <= int(row["age"]) <= 100
        assert row["site"] == ds.InstitutionName
        by_site.setdefault(row["site"], set()).add(
            (ds.StationName, ds.InstitutionAddress, ds.ManufacturerModelName))
        scanner = next(s for s in SCANNERS if s.model == ds.ManufacturerModelName)
        assert abs(float(ds.PixelSpacing[0]) * ds.Columns - scanner.fov_mm) <= 10.01
    assert len(by_site) == 3
    # One hospital, one station, one address and one scanner (whose field of view it has).
    assert all(len(v) == 1 for v in by_site.values()), by_site
    for p in range(PATIENTS):
        ident = fake_identity(p, SEED, SLICES, SIZE)
        mine = [r for r in rows if r["patient_id"] == ident.patient_id]
        assert {r["site"] for r in mine} == {ident.institution}
        assert {int(r["age"]) for r in mine} == {ident.age_years}
        assert ident.site == site_of(p, SEED)
        canaries = canary_strings(p, SEED, SLICES, SIZE)
        assert ident.institution in canaries and ident.station in canaries
        assert ident.address in canaries


def test_finding_masks_sit_beside_labels_and_match_the_findings(corpus):
    rows = _rows(corpus)
    with_mask = 0
    for p in range(PATIENTS):
        ph = draw_patient(p, SEED, SLICES, SIZE)
        ident = fake_identity(p, SEED, SLICES, SIZE)
        for row in (r for r in rows if r["patient_id"] == ident.patient_id):
            k = int(row["slice"])
            finding = bool(int(row["nodule"]) or int(row["effusion"]))
            assert bool(row["mask"]) == finding
            if not finding:
                continue
            with_mask += 1
            assert row["mask"].startswith("masks/") and row["mask"].endswith(".mask.png")
            png = np.asarray(Image.open(corpus / row["mask"]))
            assert png.dtype == np.uint8 and set(np.unique(png)) <= {0, 255}
            np.testing.assert_array_equal(png == 255, ph.nodule_mask[k] | ph.effusion_mask[k])
    assert with_mask == len(list(corpus.rglob("*.mask.png"))) > 0
