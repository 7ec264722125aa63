"""``medssl synth OUT --volumes``: the synthetic patients as whole CT series, one label each.

The same phantoms, fake identities and DICOM files as the 2-D corpus (``synth``: same seed
handling, same canaries, same sites), written as one series folder per patient,
``OUT/PAT-<fake name>/<study date>-<accession>/IM0001.dcm ...``, with consistent geometry: axial
orientation, one ImagePositionPatient step between slices, slice 0 most cranial. Beside them,
``OUT/volumes.csv`` gives one row per series (``path`` is the series folder, relative to OUT)
and its per-volume labels, so ``medssl shard OUT --volumes --recipe
datasets/recipes/demo_volumes.yaml`` writes labeled volume shards:

* ``nodule`` / ``effusion``: 1 when any slice of the volume shows one (the 2-D slice labels'
  rule, ``synth.draw_patient``), else 0;
* ``finding`` = nodule + 2 * effusion (0 none, 1 nodule, 2 effusion, 3 both), as in 2-D;
* ``any_finding``: 1 when the volume shows either. ``demo_volumes.yaml`` labels ``effusion``
  instead: on seed 0, 100 patients, 46% of volumes show fluid, 84% a nodule, 92% either --
  too few negatives for a small demo's test split;
* ``sex``, ``age``, ``site``: the patient's, as in ``labels.csv`` (``site`` is a canary).

Small by default (``DEFAULT_SLICES`` x ``DEFAULT_SIZE`` px): a demo shards a hundred patients
in seconds. The slab is always 160 mm deep, so the slice step is 160 / slices mm.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from medssl.data.synth import VOLUME_COLUMNS, VOLUMES_CSV
from medssl.errors import MedsslError

log = logging.getLogger(__name__)

DEFAULT_SLICES, DEFAULT_SIZE = 24, 40
SLAB_MM = 160.0


def write_volume_corpus(out: Path, patients: int = 24, slices: int = DEFAULT_SLICES,
                        size: int = DEFAULT_SIZE, seed: int = 0) -> Path:
    """Write ``patients`` CT series of ``slices`` x ``size`` x ``size`` under ``out`` and
    return ``out/volumes.csv`` (module docstring). Same arguments give byte-identical files."""
    from medssl.data.dicom_series import MIN_SLICES
    from medssl.data.synth import _clear_previous, draw_patient, fake_identity, slice_dataset

    out = Path(out)
    if patients < 1 or slices < MIN_SLICES or not 32 <= size <= 1024:
        raise MedsslError(f"synth --volumes: need --patients >= 1, --slices >= {MIN_SLICES} and "
                          f"32 <= --size <= 1024, got {patients}, {slices}, {size}")
    _clear_previous(out)
    out.mkdir(parents=True, exist_ok=True)
    step_mm = round(SLAB_MM / slices, 3)
    rows = []
    for p in range(patients):
        ident = fake_identity(p, seed, slices, size)
        vol = draw_patient(p, seed, slices, size)
        series = f"{ident.folder}/{ident.series_folder}"
        (out / series).mkdir(parents=True, exist_ok=True)
        for k in range(slices):
            slice_dataset(ident, vol.hu[k], vol.fov_mm, k, step_mm).save_as(
                out / series / f"IM{k + 1:04d}.dcm", enforce_file_format=True)
        nod, eff = int(vol.nodule.any()), int(vol.effusion.any())
        rows.append((series, ident.patient_id, nod, eff, nod + 2 * eff, int(nod or eff),
                     ident.sex, ident.age_years, ident.institution))
    labels = out / VOLUMES_CSV
    with labels.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(VOLUME_COLUMNS)
        writer.writerows(rows)
    arr = np.array([r[2:6] for r in rows])
    log.info("synth: wrote %d series of %d x %d px slices (seed %d) to %s; volumes with nodule "
             "%.0f%%, effusion %.0f%%, any finding %.0f%%", patients, slices, size, seed, out,
             100 * arr[:, 0].mean(), 100 * arr[:, 1].mean(), 100 * arr[:, 3].mean())
    return labels
