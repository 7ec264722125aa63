"""`medssl shard --volumes`: DICOM series and NIfTI -> RAS volume shards, quarantines, canaries."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medssl.cli import main
from medssl.data import journal as journal_mod
from medssl.data import volumes as volumes_mod
from medssl.data.sample import VOLUME_MEMBER
from medssl.data.shards import read_index
from medssl.data.verify import verify_shards
from medssl.io import sha256_file
from medssl.sample import read_sample

SPLITS = "train=0.5,val=0.25,test=0.25"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
#: Series-level header text a volume shard must never carry (canary test).
CANARIES = {
    "SeriesDescription": "CANARY SERIES ZORBLAX", "ProtocolName": "CANARY PROTOCOL QUIMBY",
    "StudyDescription": "CANARY STUDY FENWICK", "InstitutionName": "Canary Infirmary Yarrow",
    "PatientName": "Snodgrass^Philomena", "PatientID": "CANARYMRN7731",
    "PatientBirthDate": "19431107", "AcquisitionDate": "20190312", "StudyDate": "20190311",
    "StationName": "CANARYSTN42", "OperatorsName": "Quackenbush^Horatio",
    "ImageComments": "Philomena was anxious, call 555-0199",
    "AccessionNumber": "ACC88231177",
}


def volume_hu(shape=(6, 5, 4), seed=0) -> np.ndarray:
    """int16 ``[columns, rows, slices]`` of HU values (the DICOM series' voxel order)."""
    return np.random.default_rng(seed).integers(-1000, 1500, size=shape).astype(np.int16)


def write_series(folder: Path, vol: np.ndarray, *, origin=(10.0, 20.0, 30.0), step=3.0,
                 pixel=(2.0, 1.5), orientation=AXIAL, positions=None, names=None,
                 orientations=None, uid_seed="s", extra=None) -> list[Path]:
    """Write ``vol`` (``[columns, rows, slices]`` HU) as CT slices, one file per slice.

    ``positions`` overrides the offsets along the normal (mm); ``names`` the file names (to
    shuffle the file order against the positions); ``orientations`` per-slice IOP.
    """
    folder.mkdir(parents=True, exist_ok=True)
    cols, rows, n = vol.shape
    o = np.asarray(orientation, float)
    normal = np.cross(o[:3], o[3:])
    offsets = [k * step for k in range(n)] if positions is None else positions
    study, series = (generate_uid(entropy_srcs=[uid_seed, t]) for t in ("study", "series"))
    written = []
    for k in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        sop = generate_uid(entropy_srcs=[uid_seed, str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        position = np.asarray(origin) + offsets[k] * normal
        iop = orientations[k] if orientations is not None else orientation
        values = {
            "SOPClassUID": CTImageStorage, "SOPInstanceUID": sop, "Modality": "CT",
            "StudyInstanceUID": study, "SeriesInstanceUID": series, "BodyPartExamined": "CHEST",
            "ImageOrientationPatient": [f"{v:.6g}" for v in iop],
            "ImagePositionPatient": [f"{v:.6g}" for v in position],
            "PixelSpacing": [f"{pixel[0]:.6g}", f"{pixel[1]:.6g}"],
            "InstanceNumber": n - k,  # against the positions: the sort must not use it
            "Rows": rows, "Columns": cols, "SamplesPerPixel": 1,
            "PhotometricInterpretation": "MONOCHROME2", "BitsAllocated": 16, "BitsStored": 16,
            "HighBit": 15, "PixelRepresentation": 0, "RescaleIntercept": "-1024",
            "RescaleSlope": "1", "WindowCenter": "40", "WindowWidth": "400",
            "BurnedInAnnotation": "NO", **CANARIES, **(extra or {}),
        }
        for key, value in values.items():
            setattr(ds, key, value)
        ds.PixelData = (vol[:, :, k].T.astype(np.int32) + 1024).astype("<u2").tobytes()
        path = folder / (names[k] if names else f"IM{k:04d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def ras_affine(origin=(10.0, 20.0, 30.0), step=3.0, pixel=(2.0, 1.5)) -> np.ndarray:
    """The RAS affine of ``write_series``' axial volume: LPS with x and y negated."""
    lps = np.diag([pixel[1], pixel[0], step, 1.0])
    lps[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def run_shard(inputs, out, salt, *extra) -> int:
    return main(["shard", *map(str, inputs), "--out", str(out), "--salt-file", str(salt),
                 "--splits", SPLITS, "--volumes", *map(str, extra)])


def samples(out: Path) -> list:
    """Every sample of a shard folder through the reading contract, in shard then tar order."""
    found = []
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            raw: dict = {}
            for m in tar:
                key, _, ext = m.name.partition(".")
                raw.setdefault(key, {"__key__": key, "__url__": str(path)})[ext] = \
                    tar.extractfile(m).read()
        found += [read_sample(r) for r in raw.values()]
    return found


def report(out: Path) -> list[dict]:
    return [json.loads(line) for line in
            (out.parent / f"{out.name}.report.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("spacing", ["native", "1,1,1.5"])
def test_dicom_series_and_nifti_give_equal_volumes(tmp_path, salt, spacing):
    vol = volume_hu()
    write_series(tmp_path / "dicom" / "series", vol)
    nifti = tmp_path / "nifti"
    nifti.mkdir()
    nib.save(nib.Nifti1Image(vol, ras_affine()), nifti / "case.nii.gz")
    for source in ("dicom", "nifti"):
        assert run_shard([tmp_path / source], tmp_path / f"out-{source}", salt,
                         "--spacing", spacing) == 0
    (a,), (b,) = samples(tmp_path / "out-dicom"), samples(tmp_path / "out-nifti")
    assert a.is_volume and b.is_volume
    np.testing.assert_array_equal(a.image, b.image)
    assert a.spacing == b.spacing and (a.offset, a.slope) == (b.offset, b.slope)
    assert a.slope == 1.0  # integer HU stored losslessly, resampled or not
    if spacing == "native":
        assert a.spacing == (1.5, 2.0, 3.0)
        # LPS -> RAS: columns ran to patient left, rows to posterior: both axes reversed
        np.testing.assert_array_equal(a.modality_units()[0], vol[::-1, ::-1, :])
    else:
        assert a.spacing == (1.0, 1.0, 1.5) and a.image.shape[1:] == (8, 9, 7)  # MONAI: span / pixdim + 1
    assert a.unit == "HU" and a.modality == "CT" and a.window == (40.0, 400.0)
    assert read_index(tmp_path / "out-dicom")["config"]["volumes"] is True
    lines = report(tmp_path / "out-dicom")
    assert lines == [{"path": str(tmp_path / "dicom" / "series"), "outcome": "written",
                      "samples": 1, "slices": 4}]


def test_shuffled_file_order_sorts_by_position(tmp_path, salt):
    vol = volume_hu(seed=3)
    write_series(tmp_path / "ordered" / "s", vol)
    # file names run against the positions, and positions are written out of order
    write_series(tmp_path / "shuffled" / "s", vol[:, :, [2, 0, 3, 1]], positions=[6, 0, 9, 3],
                 names=["d.dcm", "b.dcm", "a.dcm", "c.dcm"])
    for name in ("ordered", "shuffled"):
        assert run_shard([tmp_path / name], tmp_path / f"out-{name}", salt,
                         "--spacing", "native") == 0
    (a,), (b,) = samples(tmp_path / "out-ordered"), samples(tmp_path / "out-shuffled")
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.modality_units()[0], vol[::-1, ::-1, :])


def test_bad_series_are_quarantined_with_a_reason(tmp_path, salt):
    scans = tmp_path / "scans"
    vol = volume_hu(shape=(4, 4, 5))
    write_series(scans / "a_good", vol, uid_seed="good")
    write_series(scans / "b_gap", vol, positions=[0, 3, 6, 12, 15], uid_seed="gap")
    write_series(scans / "c_uneven", vol, positions=[0, 3, 7, 10, 13], uid_seed="uneven")
    tilted = [AXIAL] * 4 + [(1.0, 0.0, 0.0, 0.0, 0.996195, 0.0871557)]
    write_series(scans / "d_mixed", vol, orientations=tilted, uid_seed="mixed")
    write_series(scans / "e_short", vol[:, :, :2], uid_seed="short")
    (scans / "f_broken").mkdir()
    (scans / "f_broken" / "x.dcm").write_bytes(b"not a dicom file at all" * 10)
    (scans / "g_photo.png").write_bytes(b"\x89PNG")
    code = run_shard([scans], tmp_path / "out", salt, "--spacing", "native", "--max-bad", "1")
    assert code == 0
    got = {Path(r["path"]).name: (r["outcome"], r.get("reason"), r.get("slices"))
           for r in report(tmp_path / "out")}
    assert got == {
        "a_good": ("written", None, 5), "b_gap": ("quarantined", "missing_slices", 5),
        "c_uneven": ("quarantined", "inconsistent_spacing", 5),
        "d_mixed": ("quarantined", "mixed_orientation", 5),
        "e_short": ("quarantined", "too_few_slices", 2),
        "x.dcm": ("quarantined", "unreadable", None),
        "g_photo.png": ("quarantined", "not_a_volume", None),
    }
    gap = next(r for r in report(tmp_path / "out") if r["path"].endswith("b_gap"))
    assert gap["detail"] == "1 slices missing: steps of up to 2x the 3 mm step"
    assert read_index(tmp_path / "out")["inputs"]["quarantined_by_reason"]["missing_slices"] == 1


def test_too_large_is_refused_from_headers(tmp_path, salt):
    write_series(tmp_path / "scans" / "s", volume_hu(shape=(8, 8, 4)))
    # 256 source voxels fit; resampled to 0.25 mm the volume would need ~150,000
    assert run_shard([tmp_path / "scans"], tmp_path / "out", salt, "--spacing", "0.25",
                     "--max-pixels", "1000") == 1
    (line,) = report(tmp_path / "out")
    assert line["reason"] == "too_large" and "resampled to" in line["detail"]


def test_flipped_nifti_comes_out_ras_at_the_asked_spacing(tmp_path, salt):
    # An LAS-stored volume (x runs to the patient's left) holding a linear ramp of world
    # coordinates: bilinear resampling reproduces a linear function exactly inside the grid.
    shape = (7, 6, 5)
    affine = np.array([[-2.0, 0, 0, 30.0], [0, 1.5, 0, -10.0], [0, 0, 2.5, 5.0], [0, 0, 0, 1]])
    ijk = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1).astype(float)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]

    def ramp(xyz):
        return 10 * xyz[..., 0] + 3 * xyz[..., 1] + xyz[..., 2]

    values = ramp(world).astype(np.float32)
    out, spacing, out_affine = volumes_mod.resample(values, affine, (1.0, 1.0, 1.0),
                                                    with_affine=True)
    assert spacing == (1.0, 1.0, 1.0)
    assert np.allclose(out_affine[:3, :3], np.eye(3))  # RAS axes, 1 mm
    inner = (slice(1, -2),) * 3
    grid = np.stack(np.meshgrid(*map(np.arange, out.shape), indexing="ij"), -1).astype(float)
    expected = ramp(grid @ out_affine[:3, :3].T + out_affine[:3, 3])
    np.testing.assert_allclose(out[inner], expected[inner], atol=1e-3)
    # and through the shard: the stored axis 0 runs towards the patient's right
    nifti = tmp_path / "nifti"
    nifti.mkdir()
    nib.save(nib.Nifti1Image(values, affine), nifti / "ramp.nii")
    assert run_shard([nifti], tmp_path / "out", salt, "--spacing", "1,1,1") == 0
    (s,) = samples(tmp_path / "out")
    units = s.modality_units()[0]
    assert s.spacing == (1.0, 1.0, 1.0) and s.unit is None
    assert np.all(np.diff(units[1:-2, 3, 3]) > 9) and np.all(np.diff(units[3, 1:-2, 3]) > 2)
    assert np.allclose(units, out, atol=2 * s.slope)


def test_series_headers_never_reach_shards_report_or_logs(tmp_path, salt, capfd):
    write_series(tmp_path / "scans" / "s1", volume_hu(), uid_seed="c1")
    write_series(tmp_path / "scans" / "s2", volume_hu(seed=1), uid_seed="c2",
                 extra={"PatientID": "CANARYMRN0002"})
    out = tmp_path / "out"
    assert run_shard([tmp_path / "scans"], out, salt, "--spacing", "1,1,2",
                     "--attributes", "sex,age,site,scanner") == 0
    logs = capfd.readouterr()
    blobs = [p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()]
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            blobs += [gzip.decompress(tar.extractfile(m).read()) if m.name.endswith(".gz")
                      else tar.extractfile(m).read() for m in tar]
    blobs.append((tmp_path / "out.report.jsonl").read_bytes())
    blobs += [logs.out.encode(), logs.err.encode()]
    uids = [generate_uid(entropy_srcs=[seed, t]) for seed in ("c1", "c2")
            for t in ("study", "series", "0", "1")]
    texts = [*CANARIES.values(), "CANARYMRN0002", "Philomena", "Snodgrass", "Yarrow",
             "2019-03-12", "1943-11-07", *uids]
    for blob in blobs:
        for text in texts:
            assert text.encode() not in blob, text
    (a, b) = samples(out)
    assert a.patient != b.patient and a.series != b.series and a.series.startswith("r-")
    assert a.attributes.get("site", "").startswith("site-")


def test_resume_after_interrupt_matches_uninterrupted(tmp_path, salt, monkeypatch):
    for p in range(4):
        write_series(tmp_path / "scans" / f"p{p}", volume_hu(seed=p), uid_seed=f"r{p}",
                     extra={"PatientID": f"P{p}"})
    args = ("--spacing", "1,1,2", "--shard-size", "1")
    assert run_shard([tmp_path / "scans"], tmp_path / "ref", salt, *args) == 0

    class Interrupt(BaseException):
        pass

    real, calls = journal_mod.Journal.add_shard, []

    def dying(self, *a):
        real(self, *a)
        calls.append(1)
        if len(calls) == 2:
            raise Interrupt

    monkeypatch.setattr(journal_mod.Journal, "add_shard", dying)
    with pytest.raises(Interrupt):
        run_shard([tmp_path / "scans"], tmp_path / "out", salt, *args)
    monkeypatch.undo()
    assert not (tmp_path / "out" / "index.json").exists()
    assert run_shard([tmp_path / "scans"], tmp_path / "out", salt, *args) == 0
    hashes = {p.name: sha256_file(p) for p in sorted((tmp_path / "ref").glob("*.tar"))}
    assert hashes == {p.name: sha256_file(p) for p in sorted((tmp_path / "out").glob("*.tar"))}
    assert len(hashes) == 4 and len(report(tmp_path / "out")) == 4
    # a re-run with another spacing is refused rather than mixed into the folder
    assert run_shard([tmp_path / "scans"], tmp_path / "out", salt, "--spacing", "2,2,2",
                     "--shard-size", "1") == 2


def test_verify_accepts_volume_shards_and_catches_a_corrupt_volume(tmp_path, salt):
    write_series(tmp_path / "scans" / "s", volume_hu())
    out = tmp_path / "out"
    assert run_shard([tmp_path / "scans"], out, salt, "--spacing", "native") == 0
    assert verify_shards(out) == []
    (shard,) = out.glob("*.tar")
    # Rewrite the shard with a broken vol.npy.gz and index.json updated to match, so only
    # decoding the member can tell.
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for m, data in members:
            if m.name.endswith(VOLUME_MEMBER):
                data = data[: len(data) // 2]
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    shard.write_bytes(buf.getvalue())
    index = json.loads((out / "index.json").read_text())
    index["shards"][shard.name].update(sha256=sha256_file(shard), bytes=shard.stat().st_size)
    (out / "index.json").write_text(json.dumps(index))
    problems = verify_shards(out)
    assert len(problems) == 1 and f"{VOLUME_MEMBER} does not decode" in problems[0]


def test_four_d_nifti_gives_one_volume_per_index(tmp_path, salt):
    data = np.stack([volume_hu(seed=s) for s in (0, 1)], axis=-1)
    (tmp_path / "nifti").mkdir()
    nib.save(nib.Nifti1Image(data, ras_affine()), tmp_path / "nifti" / "sub-01_bold.nii.gz")
    assert run_shard([tmp_path / "nifti"], tmp_path / "out", salt, "--spacing", "native") == 0
    got = samples(tmp_path / "out")
    assert len(got) == 2 and got[0].patient == got[1].patient and got[0].key != got[1].key
    stored = sorted((s.modality_units()[0] for s in got), key=lambda v: float(v[0, 0, 0]))
    expected = sorted((data[::-1, ::-1, :, t] for t in (0, 1)), key=lambda v: float(v[0, 0, 0]))
    for a, b in zip(stored, expected):
        np.testing.assert_array_equal(a, b)
    (line,) = report(tmp_path / "out")
    assert line["samples"] == 2 and "slices" not in line


def test_spacing_without_volumes_is_refused(tmp_path, salt, capfd):
    write_series(tmp_path / "scans" / "s", volume_hu())
    code = main(["shard", str(tmp_path / "scans"), "--out", str(tmp_path / "out"),
                 "--salt-file", str(salt), "--spacing", "1,1,1"])
    assert code == 2 and "--spacing is the voxel size of --volumes" in capfd.readouterr().err
    assert run_shard([tmp_path / "scans"], tmp_path / "out", salt, "--spacing", "1,0,1") == 2
    assert "give three positive voxel sizes" in capfd.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_volume_run_resumes_after_sigkill(tmp_path, salt):
    import os
    import signal
    import subprocess
    import sys
    import time

    from medssl.data.synth_volumes import write_volume_corpus

    corpus = tmp_path / "corpus"
    write_volume_corpus(corpus, patients=8, slices=6, size=32, seed=1)
    cmd = [sys.executable, "-m", "medssl", "shard", str(corpus), "--salt-file", str(salt),
           "--splits", SPLITS, "--shard-size", "1", "--workers", "2", "--volumes",
           "--spacing", "12,12,12", "--out"]
    # The reference on one worker (the bytes do not depend on the count; one MONAI import less)
    assert run_shard([corpus], tmp_path / "ref", salt, "--shard-size", "1", "--spacing",
                     "12,12,12") == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(out.glob("train-000001.tar")):
        time.sleep(0.005)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the parent and its workers, like a node failure
    except ProcessLookupError:
        pass
    proc.wait()
    assert not (out / "index.json").exists(), "the run finished before it could be killed"
    assert subprocess.run([*cmd, str(out)], check=False, capture_output=True).returncode == 0
    ref = {p.name: sha256_file(p) for p in sorted((tmp_path / "ref").glob("*.tar"))}
    assert ref == {p.name: sha256_file(p) for p in sorted(out.glob("*.tar"))} and len(ref) == 8
    assert verify_shards(out) == [] and len(report(out)) == 8
