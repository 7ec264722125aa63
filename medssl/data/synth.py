"""Synthetic CT-like demo corpus: DICOM series of procedurally drawn chests, with labels.

``medssl synth OUT`` writes ``OUT/PAT-<fake name>/<study date>-<accession>/IM0001.dcm ...``
plus ``OUT/labels.csv``, so the whole product (shard -> pretrain -> publish -> finetune) runs on
a laptop with no download and no patient data.

Why a hand-written generator: no library draws labelled CT-like phantoms as real DICOM series.
MONAI's ``create_test_image_3d`` makes random blobs with no anatomy, units or findings, and
pydicom only writes what it is given. Anatomy and findings here are ellipses, noise fields and
a flat fluid level, vectorised over the whole ``[K, S, S]`` volume of a patient.

Every file carries FAKE identifiers exactly where real scans carry real ones (name, MRN, dates,
institution, physicians, accession, free text, a private block, UIDs, and the folder names).
They are canaries: ``canary_strings`` lists them so tests can search shards, logs and model
cards for any of them (``synth_dicom``). Everything is derived from ``seed``: same arguments,
same bytes.

Each patient is scanned at one of three sites (``synth_sites``, which states the effect sizes):
the grain, the HU offset and the field of view are the site's, the anatomy and the findings
are the patient's. Measured on the default corpus (``write_corpus(out)``: 24 patients x 8
slices, 128 px, seed 0) and on the demo's (480 x 4): see ``datasets/README.md``, "the
generator's site effect". ``masks/`` holds where the findings are, per slice, for the
localisation score.
"""

from __future__ import annotations

import csv
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter  # scipy ships with scikit-learn, a medssl dependency

from medssl.data.synth_dicom import (  # re-exported: the corpus's public names live here
    CANARY_FIELDS,
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    RESCALE_INTERCEPT,
    FakeIdentity,
    canary_strings,
    fake_identity,
    slice_dataset,
)
from medssl.data.synth_sites import FOV_REF_MM, SCANNERS, ScanSettings, scan_settings, site_of
from medssl.errors import MedsslError

log = logging.getLogger(__name__)

#: labels.csv columns. The first six are the labels; ``sex`` (F/M), ``age`` (whole years, exact:
#: labels.csv plays the hospital archive, ingestion bands it) and ``site`` (the hospital's
#: InstitutionName, a canary) describe the patient; ``mask`` is the finding mask's path
#: (relative to OUT, empty for a slice without a finding).
LABEL_COLUMNS = ("path", "patient_id", "slice", "nodule", "effusion", "finding",
                 "sex", "age", "site", "mask")
#: Columns an earlier synth corpus may hold instead (a re-run still replaces it).
_LEGACY_HEADERS = ("path,patient_id,slice,nodule,effusion,finding",)
MASKS_FOLDER = "masks"
#: ``--volumes`` corpora (``synth_volumes``) hold this instead of labels.csv: one row per series.
VOLUMES_CSV = "volumes.csv"
VOLUME_COLUMNS = ("path", "patient_id", "nodule", "effusion", "finding", "any_finding",
                  "sex", "age", "site")
#: finding = nodule + 2 * effusion
FINDING_NAMES = ("none", "nodule", "effusion", "both")

HU_AIR, HU_FAT, HU_SOFT, HU_LUNG = -1000.0, -100.0, 45.0, -860.0


@dataclass
class Phantom:
    """One synthetic patient in memory: HU volume, where the findings are, per-slice labels."""

    hu: np.ndarray             # int16 [K, S, S], Hounsfield units, slice 0 most cranial
    lung_mask: np.ndarray      # bool [K, S, S], aerated lung (findings excluded)
    nodule_mask: np.ndarray    # bool [K, S, S]
    effusion_mask: np.ndarray  # bool [K, S, S]
    nodule: np.ndarray         # bool [K], slice label: a nodule shows (>= 3 px at 128 px)
    effusion: np.ndarray       # bool [K], slice label: fluid shows (>= 12 px at 128 px)
    fov_mm: float              # field of view; pixel spacing is fov_mm / S
    site: int = 0              # synth_sites: the scanner that made it (grain, offset, fov)
    noise_hu: float = 0.0      # grain standard deviation of this series, HU
    offset_hu: float = 0.0     # the site's HU offset, already in ``hu``

    @property
    def finding_mask(self) -> np.ndarray:
        """bool ``[K, S, S]``: nodule or effusion, what ``masks/`` holds per slice."""
        return self.nodule_mask | self.effusion_mask


def _ellipse(x: np.ndarray, y: np.ndarray, cx, cy, ax, ay) -> np.ndarray:
    """Normalised elliptic radius ``r`` (<1 inside); broadcasts ``[K,1,1]`` centres over a grid."""
    return np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: tuple[float, ...]) -> np.ndarray:
    """Correlated Gaussian noise with unit standard deviation."""
    field = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=sigma, mode="wrap")
    return field / max(float(field.std()), 1e-6)


def draw_patient(patient_index: int, seed: int = 0, slices: int = 8, size: int = 128) -> Phantom:
    """The phantom ``write_corpus`` writes for one patient (also handy for array-only tests)."""
    # Shapes and findings use one stream, pixel noise another, so the same patient has the same
    # anatomy and findings at every ``size``; the scanner has a third (synth_sites), so the
    # site changes how a patient is imaged, never who the patient is.
    return _draw_patient(np.random.default_rng([seed, patient_index, 2]),
                         np.random.default_rng([seed, patient_index, 3]), slices, size,
                         scan_settings(patient_index, seed))


def _draw_patient(
    rng: np.random.Generator, noise: np.random.Generator, slices: int, size: int,
    scan: ScanSettings,
) -> Phantom:
    """One chest: body, fat, lungs with vessels, heart, liver dome, aorta, spine, ribs, findings.

    Image rows run anterior (top) to posterior (bottom), columns patient right to left, as on a
    radiologist's screen; slice 0 is the most cranial. Geometry is in units of half of
    ``FOV_REF_MM``, so the same patient looks the same at any ``size``; the scanner's field of
    view ``scan.fov_mm`` zooms the image grid over it.
    """
    zoom = scan.fov_mm / FOV_REF_MM
    k_n, px = slices, 2.0 * zoom / size                  # px: one pixel in normalised units
    t = np.linspace(0.0, 1.0, k_n) if k_n > 1 else np.array([0.5])
    t3 = t[:, None, None]
    c = ((np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0) * np.float32(zoom)
    y, x = c[None, :, None], c[None, None, :]
    u = rng.uniform

    # Body outline and subcutaneous fat; breathes a little along the slices.
    phase = u(0, np.pi)
    body_a = u(0.78, 0.92) * (1 + 0.04 * np.sin(np.pi * t3 + phase))
    body_b = u(0.52, 0.68) * (1 + 0.03 * np.cos(np.pi * t3 + phase))
    y0 = u(-0.03, 0.06)
    fat = u(0.03, 0.09)
    hu = np.full((k_n, size, size), HU_AIR, dtype=np.float32)
    hu[_ellipse(x, y, 0, y0, body_a, body_b) < 1] = HU_FAT + u(-15, 15)
    inner = _ellipse(x, y, 0, y0, body_a - fat, body_b - fat) < 1
    hu[inner] = HU_SOFT + u(-10, 10)

    # Lungs grow from the apex, the liver dome rises into the right base, the heart sits
    # anterior-left in the middle slices.
    grow = (0.7 + 0.3 * np.sin(np.pi * np.clip(0.25 + 0.9 * t3, 0, 1)))
    lax = u(0.25, 0.31) * body_a * grow
    lay = u(0.60, 0.74) * body_b * grow
    lx = u(0.36, 0.42) * body_a
    ly = y0 - u(0.0, 0.08) * body_b
    right = _ellipse(x, y, -lx, ly, lax, lay) < 1          # patient right = image left
    left = _ellipse(x, y, lx, ly, lax * u(0.9, 1.0), lay) < 1
    heart_s = np.sin(np.pi * np.clip((t3 - 0.15) / 0.85, 0, 1))
    heart = _ellipse(x, y, 0.12 * body_a, y0 - 0.12 * body_b,
                     u(0.24, 0.3) * body_a * heart_s + 1e-3, u(0.3, 0.38) * body_b * heart_s + 1e-3) < 1
    liver_s = np.clip((t3 - u(0.45, 0.7)) / 0.4, 0, 1)
    liver = _ellipse(x, y, -0.4 * body_a, y0 + 0.35 * body_b,
                     0.5 * body_a * liver_s + 1e-3, 0.75 * body_b * liver_s + 1e-3) < 1
    right &= ~(heart | liver)
    left &= ~(heart | liver)
    lungs = right | left

    # Lung parenchyma: denser posteriorly (gravity), with a ridge network of vessels that
    # thickens towards the hilum.
    sig = 1.6 * size / 128 / zoom                        # in pixels: vessels keep their mm
    vess_field = _smooth_noise(noise, hu.shape, (0.8, sig, sig))
    vessels = np.exp(-((vess_field / 0.22) ** 2))
    hilum = np.exp(-np.abs(np.abs(x) - 0.15) / 0.35)
    lung_hu = HU_LUNG + 60 * (y - ly) / lay + vessels * hilum * u(500, 800)
    hu = np.where(lungs, lung_hu, hu)
    hu[heart & inner] = 40 + u(-5, 5)
    hu[liver & inner] = 58 + u(-5, 5)

    # Aorta, vertebra (cortical shell over cancellous bone), spinous process, ribs.
    yv = y0 + 0.72 * body_b
    rv = 0.13 * body_b
    hu[_ellipse(x, y, 0.1 * body_a, yv - 1.7 * rv, 0.065, 0.065) < 1] = 42
    vert = _ellipse(x, y, 0, yv, rv, rv)
    hu[vert < 1] = 900 + u(-100, 100)
    hu[vert < 0.78] = 300 + u(-80, 80)
    hu[_ellipse(x, y, 0, yv + 1.35 * rv, 0.25 * rv, 0.45 * rv) < 1] = 650
    ring_a, ring_b = body_a - fat - 0.04, body_b - fat - 0.04
    for angle in u(0, 2 * np.pi, size=10):
        if np.sin(angle) < -0.6:
            continue  # no ribs over the sternum in this simple model
        visible = (np.sin(2 * np.pi * (2 * t3 + angle)) > -0.2).astype(np.float32)
        cx, cy = ring_a * np.cos(angle), y0 + ring_b * np.sin(angle)
        rib = (_ellipse(x, y, cx, cy, 0.03, 0.03) < 1) & (visible > 0)
        hu[rib] = 700 + u(-100, 100)

    # A finding is drawn only in slices where it is big enough to see, so every labelled
    # slice shows it and no negative slice holds a trace of it. The threshold is in pixels,
    # the same at every site: a label means "this many pixels show it" everywhere.
    min_px = max(3, round(3 * (size / 128) ** 2))
    effusion_px = _add_effusion(rng, hu, right, left, 4 * min_px)
    aerated = lungs & ~effusion_px
    nodule_px = _add_nodules(rng, hu, x, y, aerated, lx, ly, lax, lay, px, min_px)
    # The site's scanner: a calibration offset and finely correlated grain (CT noise is not
    # white) of the site's strength.
    hu += scan.offset_hu + _smooth_noise(noise, hu.shape, (0, 0.7, 0.7)) * scan.noise_hu
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return Phantom(
        hu=hu,
        lung_mask=aerated & ~nodule_px,
        nodule_mask=nodule_px,
        effusion_mask=effusion_px,
        nodule=nodule_px.any(axis=(1, 2)),
        effusion=effusion_px.any(axis=(1, 2)),
        fov_mm=scan.fov_mm,
        site=scan.site,
        noise_hu=scan.noise_hu,
        offset_hu=scan.offset_hu,
    )


def _add_nodules(rng, hu, x, y, lung, lx, ly, lax, lay, px, min_px) -> np.ndarray:
    """Round soft-tissue nodules (radius 3-6 px at 128 px) seen in a few consecutive slices."""
    k_n = hu.shape[0]
    mask = np.zeros(hu.shape, dtype=bool)
    count = int(rng.choice([0, 1, 1, 2, 2, 3]))
    for _ in range(count):
        kc = rng.uniform(-0.5, k_n - 0.5)
        half = rng.uniform(0.6, max(1.0, 0.22 * k_n))        # half-extent, in slices
        radius = rng.uniform(3, 6) * 2.0 / 128        # 3-6 px at 128 px; same anatomy at any size
        side = rng.choice([-1.0, 1.0])
        k0 = int(np.clip(round(kc), 0, k_n - 1))
        # Upper part of the lung, away from where an effusion settles.
        ang, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.55)
        cx = side * lx[k0, 0, 0] + rad * np.cos(ang) * lax[k0, 0, 0]
        cy = ly + (rad * np.sin(ang) - 0.25) * lay[k0, 0, 0]
        value = rng.uniform(-100, 30)
        dk = (np.arange(k_n)[:, None, None] - kc) / (half + 0.5)
        r_k = radius * np.sqrt(np.clip(1 - dk ** 2, 0, 1))
        dist = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        soft = np.clip((r_k - dist) / px + 0.5, 0, 1) * lung   # anti-aliased edge, lung only
        visible = (soft > 0.5).sum(axis=(1, 2)) >= min_px
        soft[~visible] = 0
        hu += soft * (value - hu)
        mask |= soft > 0.5
    return mask


def _add_effusion(rng, hu, right, left, min_px) -> np.ndarray:
    """Dependent pleural fluid (0-20 HU) with a flat top, deepening towards the lung base."""
    k_n, rows_idx = hu.shape[0], np.arange(hu.shape[1])[:, None]
    mask = np.zeros(hu.shape, dtype=bool)
    if rng.uniform() > 0.75:
        return mask
    which = rng.choice(["right", "left", "both"])
    start = int(rng.integers(0, max(1, (2 * k_n) // 3)))
    depth = rng.uniform(0.15, 0.35)                 # fraction of lung height at the base
    value = rng.uniform(0, 20)
    for lung in ([right, left] if which == "both" else [right if which == "right" else left]):
        rows = lung.any(axis=2)                                    # [K, S]
        for k in range(start, k_n):
            if not rows[k].any():
                continue
            top, bottom = np.flatnonzero(rows[k])[[0, -1]]
            grow = 0.5 + 0.5 * (k - start + 1) / (k_n - start)
            level = bottom - depth * grow * (bottom - top)          # flat fluid line (rows)
            mask[k] |= lung[k] & (rows_idx >= level)
    mask[mask.sum(axis=(1, 2)) < min_px] = False
    hu[mask] = value
    return mask



def write_corpus(out: Path, patients: int = 24, slices: int = 8, size: int = 128, seed: int = 0) -> Path:
    """Write the demo corpus under ``out`` and return the path of ``out/labels.csv``.

    ``patients`` DICOM series of ``slices`` axial ``size x size`` CT slices (int16 stored
    values, HU = stored - 1024). ``labels.csv`` has one row per slice file: ``path`` (relative
    to ``out``), ``patient_id``, ``slice`` (0-based, cranial first), ``nodule``, ``effusion``
    (0/1) and ``finding`` = nodule + 2 * effusion (0 none, 1 nodule, 2 effusion, 3 both);
    then ``sex`` (F/M), ``age`` (whole years), ``site`` (the hospital's InstitutionName) and
    ``mask``: ``masks/<same path>.mask.png`` (8-bit, 255 where a nodule or fluid shows, 0
    elsewhere; the DICOM's grid) for a slice with a finding, empty otherwise. Masks are the
    truth of the localisation score: ``medssl shard --masks-out`` joins them to sample keys;
    they never enter a shard (``.mask.png`` files are sidecars to the folder walk).
    Same arguments give byte-identical files.
    """
    out = Path(out)
    if patients < 1 or slices < 1 or not 32 <= size <= 1024:
        raise MedsslError(
            f"synth: need --patients >= 1, --slices >= 1 and 32 <= --size <= 1024, "
            f"got {patients}, {slices}, {size}"
        )
    _clear_previous(out)
    out.mkdir(parents=True, exist_ok=True)
    spacing_mm = round(160.0 / slices, 3) if slices > 1 else 5.0
    rows: list[tuple] = []
    for p in range(patients):
        ident = fake_identity(p, seed, slices, size)
        vol = draw_patient(p, seed, slices, size)
        series = f"{ident.folder}/{ident.series_folder}"
        (out / series).mkdir(parents=True, exist_ok=True)
        findings = vol.finding_mask
        for k in range(slices):
            name = f"IM{k + 1:04d}.dcm"
            slice_dataset(ident, vol.hu[k], vol.fov_mm, k, spacing_mm).save_as(
                out / series / name, enforce_file_format=True
            )
            mask = ""
            if findings[k].any():
                mask = f"{MASKS_FOLDER}/{series}/IM{k + 1:04d}.mask.png"
                _write_mask(out / mask, findings[k])
            nod, eff = int(vol.nodule[k]), int(vol.effusion[k])
            rows.append((f"{series}/{name}", ident.patient_id, k, nod, eff, nod + 2 * eff,
                         ident.sex, ident.age_years, ident.institution, mask))
    labels = out / "labels.csv"
    with labels.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(LABEL_COLUMNS)
        writer.writerows(rows)
    arr = np.array([r[3:5] for r in rows])
    log.info(
        "synth: wrote %d patients x %d slices (%d px, seed %d) to %s; slices with nodule %.0f%%, "
        "effusion %.0f%%; patients per site %s", patients, slices, size, seed, out,
        100 * arr[:, 0].mean(), 100 * arr[:, 1].mean(),
        [sum(site_of(p, seed) == s for p in range(patients)) for s in range(len(SCANNERS))],
    )
    return labels


def _write_mask(path: Path, mask: np.ndarray) -> None:
    """``mask`` (bool ``[S, S]``) as an 8-bit 0/255 PNG; Pillow writes no timestamp."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path, format="PNG")


def _clear_previous(out: Path) -> None:
    """Allow re-running into a previous synth corpus; refuse any other non-empty folder."""
    if not out.exists():
        return
    if not out.is_dir():
        raise MedsslError(f"synth: {out} exists and is not a folder; choose another OUT")
    entries = list(out.iterdir())
    if not entries:
        return
    known = {"labels.csv": (",".join(LABEL_COLUMNS), *_LEGACY_HEADERS),
             VOLUMES_CSV: (",".join(VOLUME_COLUMNS),)}  # a 2-D or a --volumes corpus
    found = [out / name for name, headers in known.items() if (out / name).is_file()
             and (out / name).read_text().split("\n", 1)[0] in headers]
    if not found:
        raise MedsslError(
            f"synth: {out} is not empty and holds no previous synth corpus; choose a new OUT"
        )
    # Only folders this generator names (PAT-...) go; anything else stays where it is.
    for entry in entries:
        if entry.is_dir() and (entry.name.startswith("PAT-") or entry.name == MASKS_FOLDER):
            shutil.rmtree(entry)
    for labels in found:
        labels.unlink()


__all__ = [
    "CANARY_FIELDS", "FINDING_NAMES", "LABEL_COLUMNS", "MASKS_FOLDER", "PRIVATE_CREATOR",
    "PRIVATE_GROUP", "RESCALE_INTERCEPT", "FakeIdentity", "Phantom", "canary_strings",
    "draw_patient", "fake_identity", "write_corpus",
]
