"""The fake identities of the synthetic corpus, and the DICOM files that carry them.

Every file ``medssl synth`` writes carries FAKE identifiers exactly where real scans carry real
ones (name, MRN, dates, institution and station, physicians, accession, free text, a private
block, UIDs, and the folder names). They are canaries: ``canary_strings`` lists them so tests
can search shards, logs and model cards for any of them. Everything is derived from ``seed``.
The institution, its address and the station are the patient's site's (``synth_sites``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from medssl.data.synth_sites import SCANNERS, fake_word, site_of, sites

#: DICOM keywords that carry a fake identifier, date or free text in every synthetic file.
CANARY_FIELDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "AcquisitionDateTime",
    "InstitutionName", "InstitutionAddress", "StationName", "ReferringPhysicianName",
    "OperatorsName",
    "AccessionNumber", "StudyDescription", "ImageComments",
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
)
#: Private block holding a fake next-of-kin name (Annex E says: remove all private tags).
PRIVATE_GROUP = 0x0029
PRIVATE_CREATOR = "MEDSSL SYNTH CANARY"
RESCALE_INTERCEPT = -1024  # stored = HU + 1024, so a reader that skips the modality LUT is wrong

_GIVEN = ("Ottoline", "Barnabus", "Philippa", "Zebedee", "Clementine", "Peregrin",
          "Wilhelmina", "Thaddeus", "Araminta", "Montague", "Hortensia", "Ignatius")


@dataclass(frozen=True)
class FakeIdentity:
    """The fake identifiers written for one patient; every string is a canary."""

    folder: str
    series_folder: str
    patient_name: str
    patient_id: str
    sex: str
    birth_date: str
    age: str
    study_date: str
    study_time: str
    site: int
    institution: str
    address: str
    station: str
    referring: str
    operator: str
    accession: str
    study_description: str
    comment: str
    private_name: str
    study_uid: str
    series_uid: str
    frame_uid: str
    sop_uids: tuple[str, ...]

    @property
    def acquisition_datetime(self) -> str:
        return f"{self.study_date}{self.study_time}.000000"

    @property
    def age_years(self) -> int:
        """PatientAge in whole years (``047Y`` -> 47), as labels.csv writes it."""
        return int(self.age[:-1])


def fake_identity(patient_index: int, seed: int = 0, slices: int = 8, size: int = 128) -> FakeIdentity:
    """Deterministic fake identity of patient ``patient_index`` in corpus ``(seed, slices, size)``."""
    rng = np.random.default_rng([seed, patient_index, 1])
    family, given = fake_word(rng, 3), str(rng.choice(_GIVEN))
    birth = dt.date(1935, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 55)))
    study = dt.date(2014, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 9)))
    age = (study - birth).days // 365
    study_time = f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}"
    accession = f"ACC{int(rng.integers(10**7, 10**8))}"
    entropy = [f"medssl-synth/{seed}/{slices}/{size}/{patient_index}"]
    site = sites(seed)[site_of(patient_index, seed)]
    return FakeIdentity(
        folder=f"PAT-{family}_{given}_{patient_index:03d}",
        series_folder=f"{study:%Y%m%d}-{accession}",
        patient_name=f"{family}^{given}",
        patient_id=f"FAKEMRN{seed % 1000:03d}{patient_index:05d}",
        sex=str(rng.choice(["F", "M"])),
        birth_date=f"{birth:%Y%m%d}",
        age=f"{age:03d}Y",
        study_date=f"{study:%Y%m%d}",
        study_time=study_time,
        site=site.index,
        institution=site.institution,
        address=site.address,
        station=site.station,
        referring=f"{fake_word(rng, 2)}^{rng.choice(_GIVEN)}^^Dr",
        operator=f"{fake_word(rng, 2)}^{rng.choice(_GIVEN)}",
        accession=accession,
        study_description=f"CT CHEST FOLLOW-UP {family.upper()} {accession}",
        comment=f"{given} {family} tolerated the scan well, call back on 555-{patient_index:04d}",
        private_name=f"Next of kin {fake_word(rng, 3)} {rng.choice(_GIVEN)}",
        study_uid=str(generate_uid(entropy_srcs=entropy + ["study"])),
        series_uid=str(generate_uid(entropy_srcs=entropy + ["series"])),
        frame_uid=str(generate_uid(entropy_srcs=entropy + ["frame"])),
        sop_uids=tuple(str(generate_uid(entropy_srcs=entropy + [f"sop{k}"])) for k in range(slices)),
    )


def canary_strings(patient_index: int, seed: int = 0, slices: int = 8, size: int = 128) -> list[str]:
    """Every identifying string written for one patient, for leak searches in shards and logs.

    Dates come in DICOM (``YYYYMMDD``) and ISO (``YYYY-MM-DD``) forms. The site's hospital
    (InstitutionName, the labels.csv ``site``), its address and StationName are canaries: a
    shard may carry a site only as a salted pseudonym. PatientSex (one letter) and PatientAge
    (``047Y``, labels.csv ``age`` 47) are written but left out here: too short to search for
    without false alarms in compressed pixel bytes; test them in text outputs (json,
    index, logs) instead.
    """
    ident = fake_identity(patient_index, seed, slices, size)
    family, given = ident.patient_name.split("^")
    found = [
        ident.folder, ident.series_folder, ident.patient_name, family, given + " " + family,
        ident.patient_id, ident.accession, ident.acquisition_datetime,
        ident.institution, ident.address, ident.station, ident.referring, ident.operator,
        ident.study_description, ident.comment, ident.private_name,
        ident.study_uid, ident.series_uid, ident.frame_uid, *ident.sop_uids,
    ]
    for day in (ident.birth_date, ident.study_date):
        found += [day, f"{day[:4]}-{day[4:6]}-{day[6:]}"]
    return list(dict.fromkeys(found))



#: Attributes every synthetic slice shares; none of them identifies anyone.
_CONSTANT = {
    "SpecificCharacterSet": "ISO_IR 100", "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
    "SOPClassUID": CTImageStorage, "Modality": "CT", "Manufacturer": "MEDSSL SYNTHETIC",
    "SeriesDescription": "AXIAL CHEST", "BodyPartExamined": "CHEST", "KVP": "120",
    "PatientPosition": "HFS", "StudyID": "1", "SeriesNumber": 2,
    "ImageOrientationPatient": [1, 0, 0, 0, 1, 0], "SamplesPerPixel": 1,
    "PhotometricInterpretation": "MONOCHROME2", "BitsAllocated": 16, "BitsStored": 16,
    "HighBit": 15, "PixelRepresentation": 1, "BurnedInAnnotation": "NO", "WindowCenter": "40",
    "WindowWidth": "400", "RescaleIntercept": str(RESCALE_INTERCEPT), "RescaleSlope": "1",
    "RescaleType": "HU",
}


def slice_dataset(ident: FakeIdentity, hu: np.ndarray, fov_mm: float, k: int, spacing_mm: float) -> Dataset:
    """Slice ``k`` (``hu``: int16 ``[S, S]``, HU) as a CT Image Storage dataset with file meta."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ident.sop_uids[k]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = "MEDSSL_SYNTH"
    size = hu.shape[0]
    pixel, z = fov_mm / size, -spacing_mm * k
    corner = f"{-fov_mm / 2 + pixel / 2:.6g}"
    values = dict(_CONSTANT)
    values.update({
        # The canaries: fake identity where real scans keep the real one.
        "PatientName": ident.patient_name, "PatientID": ident.patient_id,
        "PatientBirthDate": ident.birth_date, "PatientSex": ident.sex, "PatientAge": ident.age,
        "StudyDate": ident.study_date, "SeriesDate": ident.study_date,
        "AcquisitionDate": ident.study_date, "ContentDate": ident.study_date,
        "StudyTime": ident.study_time, "SeriesTime": ident.study_time,
        "AcquisitionTime": ident.study_time, "ContentTime": ident.study_time,
        "AcquisitionDateTime": ident.acquisition_datetime, "AccessionNumber": ident.accession,
        "InstitutionName": ident.institution, "InstitutionAddress": ident.address,
        "StationName": ident.station, "ManufacturerModelName": SCANNERS[ident.site].model,
        "ReferringPhysicianName": ident.referring, "OperatorsName": ident.operator,
        "StudyDescription": ident.study_description, "ImageComments": ident.comment,
        "StudyInstanceUID": ident.study_uid, "SeriesInstanceUID": ident.series_uid,
        "SOPInstanceUID": ident.sop_uids[k], "FrameOfReferenceUID": ident.frame_uid,
        # Geometry.
        "InstanceNumber": k + 1, "SliceThickness": f"{spacing_mm:.4g}",
        "ImagePositionPatient": [corner, corner, f"{z:.6g}"], "SliceLocation": f"{z:.6g}",
        "Rows": size, "Columns": size, "PixelSpacing": [f"{pixel:.6g}", f"{pixel:.6g}"],
    })
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", ident.private_name)
    stored = hu.astype(np.int32) - RESCALE_INTERCEPT
    ds.PixelData = stored.astype("<i2").tobytes()
    return ds


__all__ = ["CANARY_FIELDS", "PRIVATE_CREATOR", "PRIVATE_GROUP", "RESCALE_INTERCEPT", "FakeIdentity",
           "canary_strings", "fake_identity", "slice_dataset"]
