"""De-identification: canaries planted in every carrier must not reach metadata, keys or logs."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import stat
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image, PngImagePlugin
from pydicom.data import get_testdata_file
from pydicom.uid import ImplicitVRLittleEndian

from medssl.data.deid import Pseudonymizer, load_or_create_salt, salt_id, sample_metadata
from medssl.data.readers import Quarantine, read_slices
from medssl.data.sample import SAMPLE_META_KEYS, Slice
from medssl.errors import MedsslError

SALT = b"0123456789abcdef0123456789abcdef"
CANARY = "CANARYzq"
KEY_RE = re.compile(r"p-[0-9a-f]{16}-[0-9a-f]{12}")


def _assert_clean(text: str) -> None:
    assert CANARY.lower() not in text.lower(), text


def _write_canary_dicom(tmp_path: Path, **extra) -> Path:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName = f"{CANARY}^Name"
    ds.PatientID = f"{CANARY}-ID"
    ds.PatientBirthDate = "19010101"
    ds.StudyDate = "19020202"
    ds.InstitutionName = f"{CANARY} General"
    ds.ReferringPhysicianName = f"{CANARY}^Doctor"
    ds.AccessionNumber = f"{CANARY}ACC"
    ds.StudyDescription = f"{CANARY} chest pain"
    ds.StudyInstanceUID = "1.2.3.999.19020202"
    ds.SeriesInstanceUID = "1.2.3.999.19020203"
    ds.BodyPartExamined = f"{CANARY} free"  # free text where a code belongs
    ds.add_new(0x00291010, "LO", f"{CANARY} private")
    # Free text in numeric elements: written as LO, read back (implicit VR) as IS/DS, which
    # makes pydicom warn and log, quoting the value.
    ds.add_new(0x00200013, "LO", f"{CANARY}7")  # InstanceNumber
    ds.add_new(0x00280030, "LO", f"{CANARY}\\0.5")  # PixelSpacing
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    path = tmp_path / "scan.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _canary_dicom(tmp_path: Path, **extra) -> Path:
    # pydicom warns, quoting the value, about free text in a CS element: expected here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _write_canary_dicom(tmp_path, **extra)


def test_dicom_canaries_never_reach_metadata_key_or_log(tmp_path, caplog):
    path = _canary_dicom(tmp_path)
    pseudo = Pseudonymizer(SALT)
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        slices = list(read_slices(path))
    _assert_clean(" ".join(str(w.message) for w in shown))
    meta = sample_metadata(slices[0], pseudo, intensity={"offset": -1024.0, "slope": 1.0})
    key = pseudo.sample_key(meta["patient"], str(path), 0)
    dumped = json.dumps(meta)
    for needle in (CANARY, "1901", "1902", "999"):
        assert needle.lower() not in dumped.lower()
        assert needle.lower() not in key.lower()
    _assert_clean(caplog.text)
    assert meta["body_part"] is None and meta["modality"] == "CT"
    assert meta["slice_index"] is None and meta["pixel_spacing"] is None
    assert meta["patient"] == pseudo.patient(f"{CANARY}-ID")
    assert meta["study"] == pseudo.study("1.2.3.999.19020202")
    assert KEY_RE.fullmatch(key)


def test_quarantine_message_quotes_nothing_from_the_file(tmp_path):
    path = _canary_dicom(tmp_path, BurnedInAnnotation="YES")
    with pytest.raises(Quarantine) as info:
        list(read_slices(path))
    _assert_clean(str(info.value))


def test_too_large_detail_quotes_nothing_from_the_file(tmp_path, caplog):
    # The too_large message reaches the report's "detail": it must be numbers only, even when
    # the size attributes themselves hold text.
    path = _canary_dicom(tmp_path, BurnedInAnnotation="NO")
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    with pytest.raises(Quarantine) as info:
        list(read_slices(path, max_pixels=100))
    assert info.value.reason == "too_large"
    _assert_clean(info.value.message)
    _assert_clean(caplog.text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        ds.add_new(0x00280011, "LO", f"{CANARY}")  # Columns as free text
        ds.save_as(path)
    caplog.clear()  # what pydicom logged for the test's own edit is not medssl's
    with pytest.raises(Quarantine) as info:
        list(read_slices(path, max_pixels=100))
    _assert_clean(str(info.value))
    _assert_clean(caplog.text)


def test_nifti_header_text_and_extensions_dropped(tmp_path, caplog):
    img = nib.Nifti1Image(np.arange(60, dtype=np.float32).reshape(3, 4, 5), np.eye(4))
    img.header["descrip"] = f"{CANARY} descrip".encode()
    img.header["aux_file"] = f"{CANARY}aux".encode()
    img.header["db_name"] = f"{CANARY}db".encode()
    img.header["intent_name"] = f"{CANARY}in".encode()
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, f"{CANARY} comment".encode()))
    nib.save(img, tmp_path / "vol01.nii.gz")
    assert CANARY.encode() in nib.load(tmp_path / "vol01.nii.gz").header.extensions[0].get_content()
    pseudo = Pseudonymizer(SALT)
    caplog.set_level(logging.DEBUG)
    for s in read_slices(tmp_path / "vol01.nii.gz"):
        _assert_clean(json.dumps(sample_metadata(s, pseudo, {"offset": 0.0, "slope": 1.0})))
        _assert_clean(repr(s.extra))
    _assert_clean(caplog.text)


def test_png_text_and_jpeg_exif_dropped(tmp_path, caplog):
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", f"{CANARY} png text")
    info.add_itxt("Author", f"{CANARY} itxt")
    folder = tmp_path / "patient7"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "a.png", pnginfo=info)
    exif = Image.Exif()
    exif[0x010E] = f"{CANARY} exif"  # ImageDescription
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "b.jpg", exif=exif)
    pseudo = Pseudonymizer(SALT)
    caplog.set_level(logging.DEBUG)
    for name in ("a.png", "b.jpg"):
        assert CANARY.encode() in (folder / name).read_bytes()
        (s,) = read_slices(folder / name)
        meta = sample_metadata(s, pseudo, None)
        _assert_clean(json.dumps(meta))
        _assert_clean(repr(s.extra))
        assert meta["patient"] == pseudo.patient("patient7")
    _assert_clean(caplog.text)


def test_pseudonyms_stable_per_salt_and_distinct_across_salts_and_domains():
    a, a2, b = Pseudonymizer(SALT), Pseudonymizer(SALT), Pseudonymizer(b"x" * 32)
    assert a.patient("12345") == a2.patient(" 12345 ") != b.patient("12345")
    assert re.fullmatch(r"p-[0-9a-f]{16}", a.patient("12345"))
    assert re.fullmatch(r"s-[0-9a-f]{16}", a.study("12345"))
    assert re.fullmatch(r"r-[0-9a-f]{16}", a.series("12345"))
    assert len({a.patient("X")[2:], a.study("X")[2:], a.series("X")[2:]}) == 3
    assert a.study(None) is None and a.series("") is None
    keys = {a.sample_key(a.patient("1"), "/data/x.dcm", i) for i in range(50)}
    keys.add(a.sample_key(a.patient("1"), "/data/y.dcm", 0))
    assert len(keys) == 51 and all(KEY_RE.fullmatch(k) for k in keys)
    assert a.sample_key("p-0", "s", 3) == a2.sample_key("p-0", "s", 3)
    with pytest.raises(ValueError):
        Pseudonymizer(b"short")


def test_salt_created_beside_not_inside_shard_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDSSL_SALT", raising=False)
    shards = tmp_path / "out" / "shards"
    salt = load_or_create_salt(None, shards)
    path = tmp_path / "out" / "shards.salt"
    assert path.read_bytes() == salt and len(salt) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not shards.exists() or not any(shards.iterdir())
    assert load_or_create_salt(None, shards) == salt  # reused, not regenerated
    assert salt_id(salt) == hashlib.sha256(salt).hexdigest()[:12]


def test_salt_sources_and_errors(tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    monkeypatch.setenv("MEDSSL_SALT", "s" * 20)
    assert load_or_create_salt(None, shards) == b"s" * 20
    assert not (tmp_path / "shards.salt").exists()
    given = tmp_path / "my.salt"
    given.write_bytes(b"k" * 24 + b"\n")
    assert load_or_create_salt(given, shards) == b"k" * 24  # file beats env
    short = tmp_path / "short.salt"
    short.write_bytes(b"abc")
    with pytest.raises(MedsslError, match="short.salt"):
        load_or_create_salt(short, shards)
    with pytest.raises(MedsslError, match="not found"):
        load_or_create_salt(tmp_path / "missing.salt", shards)
    shards.mkdir()
    (shards / "in.salt").write_bytes(b"k" * 32)
    with pytest.raises(MedsslError, match="inside the shard folder"):
        load_or_create_salt(shards / "in.salt", shards)
    monkeypatch.setenv("MEDSSL_SALT", "tooshort")
    with pytest.raises(MedsslError, match="MEDSSL_SALT"):
        load_or_create_salt(None, shards)


def test_sample_metadata_allow_list_and_types():
    pseudo = Pseudonymizer(SALT)
    s = Slice(
        pixels=np.zeros((4, 4), np.int16), patient_id="pid", source="/x/y.dcm",
        study_id="1.2", series_id="1.3", modality="CT", body_part="CHEST", view="PA",
        pixel_spacing=(np.float64(0.5), np.float32(0.25)), slice_index=np.int64(7),
        window=(np.float32(40), 400), unit="HU", label=np.array([0, 1, 1]),
        attributes={"sex": "F", "age": "40-59"}, extra={"secret": CANARY},
    )
    meta = sample_metadata(s, pseudo, {"offset": np.float64(-1024), "slope": 1})
    assert set(meta) == set(SAMPLE_META_KEYS) - {"spacing"}  # spacing: volumes only
    assert json.loads(json.dumps(meta)) == meta  # plain JSON types only
    assert meta["pixel_spacing"] == [0.5, 0.25] and meta["slice_index"] == 7
    assert meta["intensity"] == {"offset": -1024.0, "slope": 1.0, "unit": "HU"}
    assert meta["window"] == {"center": 40.0, "width": 400.0} and meta["label"] == [0, 1, 1]
    s.pixels, s.spacing = np.zeros((4, 4, 2), np.int16), (np.float32(1.5), 1.5, 2)
    assert sample_metadata(s, pseudo, None)["spacing"] == [1.5, 1.5, 2.0]
    s.spacing = (1.5, 0.0, 2.0)
    with pytest.raises(ValueError, match="spacing"):
        sample_metadata(s, pseudo, None)
    assert meta["channels"] == 1 and type(meta["slice_index"]) is int
    assert meta["attributes"] == {"age": "40-59", "sex": "F"}
    _assert_clean(json.dumps(meta))

    rgb = Slice(pixels=np.zeros((2, 2, 3), np.uint8), patient_id="pid", source="x",
                modality="ot", body_part="Head^Neck", view="V" * 17, window=(10, 0),
                pixel_spacing=(float("nan"), 1.0))
    meta = sample_metadata(rgb, pseudo)
    assert "label" not in meta and "attributes" not in meta
    assert meta["channels"] == 3 and meta["intensity"] is None
    assert meta["modality"] is meta["body_part"] is meta["view"] is None
    assert meta["window"] is None and meta["pixel_spacing"] is None
    assert meta["study"] is None and meta["series"] is None
