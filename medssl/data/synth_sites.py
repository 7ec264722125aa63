"""The three hospitals of the synthetic corpus, and how their scanners differ.

Every patient of ``medssl synth`` is scanned at one of three sites (``site_of``). A site is a
fake hospital (``InstitutionName``, ``InstitutionAddress``, ``StationName``: canaries, drawn
from the seed) with a scanner whose images differ the way real scanners' do:

============  ==============  ===============  ==============  ======================
site          grain std (HU)  HU offset        field of view   ``ManufacturerModelName``
============  ==============  ===============  ==============  ======================
0             8 (x 0.9-1.1)   0                350 mm +- 10    ``SYNTH CT 128``
1             16 (x 0.9-1.1)  +25              400 mm +- 10    ``SYNTH CT 64``
2             28 (x 0.9-1.1)  +50              450 mm +- 10    ``SYNTH CT 16``
============  ==============  ===============  ==============  ======================

- Grain: the standard deviation of the correlated pixel noise (dose and kernel differ).
- Offset: added to every HU value (a calibration drift), so air reads -1000 + offset.
- Field of view: the same patient covers less of the image at a wider field of view (the
  anatomy is drawn in millimetres: at 450 mm a body fills 0.78 of the width it fills at 350 mm,
  and nodules shrink in pixels by the same factor). ``PixelSpacing`` is ``fov_mm / size``.

What does NOT depend on the site: anatomy and findings are drawn from the patient's own
streams before the site's scanner is applied, and a slice is labelled only where its finding
covers the same minimum number of pixels at every site (3 px for a nodule, 12 for fluid, at
128 px). The offset moves a finding and the lung around it alike, so contrast is unchanged;
the weakest labelled finding stays at least 16 grain standard deviations above the lung at
the noisiest site (nodule; fluid 25), so a finding is plain to see at every site, and the
benchmark's site shift measures the scanner effect, not a change of what the labels mean.

Measured (``draw_patient``, seed 0, 128 px; grain std and mean in the top 1/16 of the rows,
which is air; body = fraction of pixels above -500 HU), per site 0 / 1 / 2:

- demo corpus (480 patients x 4 slices): grain 8.0 / 16.0 / 27.7 HU, air -1000 / -975 / -950
  HU, field of view 350 / 400 / 450 mm, body 0.32 / 0.24 / 0.19 of the image; slices with a
  nodule 55 / 55 / 54 %, with fluid 59 / 60 / 58 %.
- default corpus (24 x 8): grain 8.1 / 15.6 / 28.8 HU, air -1000 / -975 / -950 HU, field of
  view 352 / 398 / 450 mm, body 0.32 / 0.24 / 0.18; nodule 48 / 42 / 42 %, fluid 58 / 42 / 61 %
  (8 patients per site: the prevalence gaps are the draw of patients, not the site: the
  findings never read the site).

Sites are assigned in blocks of three consecutive patients, one of each site per block in an
order drawn from the seed: any corpus holds the sites within one patient of each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Millimetres covered by the anatomy's normalised unit: a patient drawn at field of view
#: ``FOV_REF_MM`` looks as it always did; a wider field of view zooms out.
FOV_REF_MM = 350.0
N_SITES = 3


@dataclass(frozen=True)
class SiteScanner:
    """One site's scanner: what makes its images differ (see the module docstring)."""

    noise_hu: float   # grain standard deviation, HU (per patient x U(0.9, 1.1))
    offset_hu: float  # added to every HU value
    fov_mm: float     # field of view, mm (per patient +- FOV_JITTER_MM)
    model: str        # ManufacturerModelName: a scanner, not a person or a place


SCANNERS = (
    SiteScanner(noise_hu=8.0, offset_hu=0.0, fov_mm=350.0, model="SYNTH CT 128"),
    SiteScanner(noise_hu=16.0, offset_hu=25.0, fov_mm=400.0, model="SYNTH CT 64"),
    SiteScanner(noise_hu=28.0, offset_hu=50.0, fov_mm=450.0, model="SYNTH CT 16"),
)
FOV_JITTER_MM = 10.0
NOISE_JITTER = 0.1

_SYLLABLES = ("zor", "quil", "vex", "bram", "thon", "plix", "gorm", "wend",
              "yarr", "kest", "mulb", "frin", "zanth", "oph", "trel", "drax")
_TOWNS = ("Nowhere-on-Sea", "Little Fakeham", "Mockbury", "Phantom Wells")


@dataclass(frozen=True)
class Site:
    """One fake hospital of a corpus: its identifying strings (canaries) and its scanner."""

    index: int
    institution: str   # InstitutionName, and labels.csv ``site``
    address: str       # InstitutionAddress
    station: str       # StationName (VR SH: at most 16 characters)
    scanner: SiteScanner


def fake_word(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(_SYLLABLES, size=n)).capitalize()


def sites(seed: int = 0) -> tuple[Site, ...]:
    """The three sites of corpus ``seed``: distinct names, fixed scanners."""
    rng = np.random.default_rng([seed, 6])
    words: list[str] = []
    while len(words) < N_SITES:  # distinct hospital names, still a pure function of the seed
        word = fake_word(rng, 2)
        if word not in words:
            words.append(word)
    out = []
    for i, word in enumerate(words):
        out.append(Site(
            index=i,
            institution=f"Saint {word} Synthetic Infirmary",
            address=f"{int(rng.integers(1, 999))} {fake_word(rng, 2)} Road, {_TOWNS[i]}",
            station=f"{word.upper()[:9]}CT{i + 1}",
            scanner=SCANNERS[i],
        ))
    return tuple(out)


def site_of(patient_index: int, seed: int = 0) -> int:
    """The site (0, 1, 2) patient ``patient_index`` of corpus ``seed`` is scanned at."""
    block = np.random.default_rng([seed, patient_index // N_SITES, 5]).permutation(N_SITES)
    return int(block[patient_index % N_SITES])


@dataclass(frozen=True)
class ScanSettings:
    """The scanner settings of one patient's series: the site's, with a per-patient jitter."""

    site: int
    noise_hu: float
    offset_hu: float
    fov_mm: float


def scan_settings(patient_index: int, seed: int = 0) -> ScanSettings:
    """Deterministic scanner settings of one patient (its own stream: anatomy is untouched)."""
    site = site_of(patient_index, seed)
    scanner = SCANNERS[site]
    rng = np.random.default_rng([seed, patient_index, 4])
    return ScanSettings(
        site=site,
        noise_hu=scanner.noise_hu * float(rng.uniform(1 - NOISE_JITTER, 1 + NOISE_JITTER)),
        offset_hu=scanner.offset_hu,
        fov_mm=scanner.fov_mm + float(rng.uniform(-FOV_JITTER_MM, FOV_JITTER_MM)),
    )


__all__ = ["FOV_REF_MM", "N_SITES", "SCANNERS", "ScanSettings", "Site", "SiteScanner",
           "scan_settings", "site_of", "sites"]
