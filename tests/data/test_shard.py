"""`medssl shard` end to end: synthetic corpus, real library files, bad inputs, resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pydicom
import pytest

from medssl.cli import main
from medssl.data import journal as journal_mod
from medssl.data import sample as sample_mod
from medssl.data import shard as shard_mod
from medssl.data import worker as worker_mod
from medssl.data.sample import SAMPLE_META_KEYS
from medssl.data.shards import read_index
from medssl.io import sha256_file
from medssl.data.synth import canary_strings, write_corpus
from medssl.data.verify import verify_shards
from medssl.lock import LOCK_NAME

PATIENTS, SLICES, SIZE = 12, 2, 64
SPLITS = "train=0.5,val=0.25,test=0.25"
KEY = re.compile(r"^p-[0-9a-f]{16}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "scans"
    write_corpus(out, patients=PATIENTS, slices=SLICES, size=SIZE, seed=0)
    return out


def run_shard(inputs, out, salt, *extra) -> int:
    return main(["shard", *map(str, inputs), "--out", str(out), "--salt-file", str(salt),
                 "--splits", SPLITS, *map(str, extra)])


def untouched(out: Path) -> dict[str, int]:
    """mtimes of the folder's files, but the lock (rewritten by every run that takes it)."""
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != LOCK_NAME}


def shard_hashes(out: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(out.glob("*.tar"))}


def members(out: Path):
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar:
                yield path.name, m.name, tar.extractfile(m).read()


def test_synthetic_corpus_end_to_end(corpus, tmp_path, salt, capfd):
    out = tmp_path / "shards"
    assert run_shard([corpus], out, salt, "--shard-size", 5) == 0
    logs = capfd.readouterr()
    index = read_index(out)
    n = PATIENTS * SLICES
    assert index["inputs"] == {"seen": n, "written": n, "quarantined": 0,
                               "quarantined_by_reason": {}, "skipped_slices_by_reason": {}}
    assert sum(s["samples"] for s in index["splits"].values()) == n
    assert sum(s["samples"] for s in index["shards"].values()) == n
    assert index["modalities"] == {"CT": n}
    assert index["config"]["salt_id"] and bytes(range(32)).hex() not in json.dumps(index)
    assert re.fullmatch(r"\d{4}", index["created"])  # the year, no finer date
    # patients: disjoint, all counted, fractions roughly kept (binomial, n=12: sd ~1.5)
    assert sum(s["patients"] for s in index["splits"].values()) == PATIENTS
    for name, fraction in (("train", 0.5), ("val", 0.25), ("test", 0.25)):
        assert abs(index["splits"][name]["patients"] - PATIENTS * fraction) <= 4.5
    assert verify_shards(out) == []
    # the folder holds shards, index.json and the (hidden) lock only; the report lies beside it
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".tar")) == \
        [LOCK_NAME, "index.json"]
    assert set(json.loads((out / LOCK_NAME).read_text())) == {"host", "pid", "command"}
    report = tmp_path / "shards.report.jsonl"
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    assert len(lines) == n and all(r == {"path": r["path"], "outcome": "written", "samples": 1}
                                   for r in lines)
    assert "report: " + str(report) in logs.out
    # keys are pseudonyms; metadata is allow-listed; each split's shards hold only it
    seen_keys = set()
    for _, name, data in members(out):
        key, ext = name.split(".", 1)
        assert KEY.match(key) and ext in ("img.png", "json")
        seen_keys.add(key)
        if ext == "json":
            meta = json.loads(data)
            assert set(meta) <= set(SAMPLE_META_KEYS)
            assert meta["intensity"]["unit"] == "HU" and meta["intensity"]["slope"] == 1.0
            assert meta["window"]["width"] > 0 and meta["patient"] == key[:18]
    assert len(seen_keys) == n
    # canaries: no fake name, MRN, date, UID or folder name in the folder or the logs
    blob = b"".join(p.read_bytes() for p in sorted(out.iterdir()))
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            for f in sorted(corpus.rglob("*.dcm"))}
    for p in range(PATIENTS):
        for canary in canary_strings(p, 0, SLICES, SIZE):
            assert canary.encode() not in blob, canary
            assert canary not in logs.err and canary not in logs.out.replace(str(report), "")
    for uid in uids:
        assert uid.encode() not in blob and not any(uid in k for k in seen_keys)
    assert str(corpus).encode() not in blob


def test_workers_do_not_change_the_output(corpus, tmp_path, salt):
    one, two = tmp_path / "w1", tmp_path / "w2"
    assert run_shard([corpus], one, salt, "--shard-size", 4, "--workers", 1) == 0
    assert run_shard([corpus], two, salt, "--shard-size", 4, "--workers", 2) == 0
    assert shard_hashes(one) == shard_hashes(two) and len(shard_hashes(one)) >= 3
    assert read_index(one)["shards"] == read_index(two)["shards"]


def test_rerun_same_args_is_a_noop_other_args_refused(corpus, tmp_path, salt, capfd):
    out = tmp_path / "shards"
    assert run_shard([corpus], out, salt, "--shard-size", 5) == 0
    before = untouched(out)
    capfd.readouterr()
    assert run_shard([corpus], out, salt, "--shard-size", 5) == 0
    assert "already complete" in capfd.readouterr().out
    assert untouched(out) == before
    assert run_shard([corpus], out, salt, "--shard-size", 6) == 2
    assert "different settings (shard_size: 5 -> 6)" in capfd.readouterr().err
    assert untouched(out) == before


def test_report_inside_the_shard_folder_is_refused(corpus, tmp_path, salt, capfd):
    out = tmp_path / "shards"
    assert run_shard([corpus], out, salt, "--report", out / "r.jsonl") == 2
    assert "inside the shard folder" in capfd.readouterr().err


class Interrupt(BaseException):
    """Stands in for SIGINT/SIGKILL at a chosen point of the writer."""


def die_after(monkeypatch, cls: type, name: str, calls: int) -> None:
    """Make ``cls.name`` do its work, then raise Interrupt on its ``calls``-th call."""
    real = getattr(cls, name)
    count = []

    def wrapped(self, *args):
        real(self, *args)
        count.append(1)
        if len(count) == calls:
            raise Interrupt

    monkeypatch.setattr(cls, name, wrapped)


def test_resume_after_interrupt_matches_uninterrupted(corpus, tmp_path, salt, monkeypatch):
    reference = tmp_path / "ref"
    assert run_shard([corpus], reference, salt, "--shard-size", 2) == 0
    out = tmp_path / "resumed"
    die_after(monkeypatch, journal_mod.Journal, "add_shard", 3)
    with pytest.raises(Interrupt):
        run_shard([corpus], out, salt, "--shard-size", 2)
    monkeypatch.undo()
    assert not (out / "index.json").exists() and len(list(out.glob("*.tar"))) == 3
    assert run_shard([corpus], out, salt, "--shard-size", 2) == 0
    assert shard_hashes(out) == shard_hashes(reference)
    assert read_index(out)["splits"] == read_index(reference)["splits"]
    assert verify_shards(out) == []
    assert (tmp_path / "resumed.report.jsonl").read_text().count("\n") == PATIENTS * SLICES
    assert not list(out.glob("*.tmp")) and not (out / ".progress.jsonl").exists()


def test_resume_refuses_other_args_and_redoes_damaged_shards(corpus, tmp_path, salt, monkeypatch,
                                                            capfd):
    reference = tmp_path / "ref"
    assert run_shard([corpus], reference, salt, "--shard-size", 2) == 0
    out = tmp_path / "resumed"
    die_after(monkeypatch, shard_mod.SplitWriter, "close", 4)
    with pytest.raises(Interrupt):
        run_shard([corpus], out, salt, "--shard-size", 2)
    monkeypatch.undo()
    capfd.readouterr()
    assert run_shard([corpus], out, salt, "--shard-size", 3) == 2
    assert "different settings is in this folder (shard_size: 2 -> 3)" in capfd.readouterr().err
    first = sorted(out.glob("*.tar"))[0]
    first.write_bytes(first.read_bytes()[:-10] + b"x" * 10)  # damaged while we were away
    (out / "train-000999.tar.tmp").write_bytes(b"partial")
    assert run_shard([corpus], out, salt, "--shard-size", 2) == 0
    assert shard_hashes(out) == shard_hashes(reference)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path, salt):
    corpus = tmp_path / "big"
    write_corpus(corpus, patients=6, slices=6, size=64, seed=1)
    cmd = [sys.executable, "-m", "medssl", "shard", str(corpus), "--salt-file", str(salt),
           "--splits", SPLITS, "--shard-size", "2", "--workers", "2", "--out"]
    reference = tmp_path / "ref"
    subprocess.run([*cmd, str(reference)], check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(out.glob("*-000001.tar")):
        time.sleep(0.005)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the parent and its workers, like a node failure
    except ProcessLookupError:
        pass
    proc.wait()
    assert not (out / "index.json").exists(), "the run finished before it could be killed"
    assert subprocess.run([*cmd, str(out)], capture_output=True).returncode == 0
    assert shard_hashes(out) == shard_hashes(reference)
    assert verify_shards(out) == []
    lines = (tmp_path / "killed.report.jsonl").read_text().splitlines()
    assert len(lines) == 36 == len({json.loads(line)["path"] for line in lines})


def _library_files(folder: Path) -> None:
    """Real files from pydicom, nibabel and scikit-image, plus broken ones."""
    import nibabel
    import pydicom.data
    import skimage

    dicoms = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent
    for name in ("CT_small.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg.dcm", "rtplan.dcm"):
        shutil.copy(dicoms / name, folder / name)
    shutil.copy(Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii",
                folder / "anatomical.nii")
    for name in ("camera.png", "chelsea.png"):
        (folder / name[:-4]).mkdir()
        shutil.copy(Path(skimage.__file__).parent / "data" / name, folder / name[:-4] / name)
    data = (dicoms / "CT_small.dcm").read_bytes()
    (folder / "truncated.dcm").write_bytes(data[: len(data) // 3])
    (folder / "garbage.dcm").write_bytes(os.urandom(4096))


def test_real_files_and_broken_ones(tmp_path, salt, capfd):
    scans = tmp_path / "scans"
    scans.mkdir()
    _library_files(scans)
    out = tmp_path / "shards"
    assert run_shard([scans], out, salt) == 0
    index = read_index(out)
    report = {Path(r["path"]).name: r for r in
              map(json.loads, (tmp_path / "shards.report.jsonl").read_text().splitlines())}
    assert len(report) == index["inputs"]["seen"] == 9
    written = {k for k, r in report.items() if r["outcome"] == "written"}
    assert {"CT_small.dcm", "MR_small_RLE.dcm", "anatomical.nii", "camera.png",
            "chelsea.png"} <= written
    for bad in ("truncated.dcm", "garbage.dcm", "SC_rgb_jpeg.dcm", "rtplan.dcm"):
        assert report[bad]["outcome"] == "quarantined" and report[bad]["reason"], bad
    reasons = index["inputs"]["quarantined_by_reason"]
    assert sum(reasons.values()) == index["inputs"]["quarantined"] == 9 - len(written)
    assert reasons.get("secondary_capture") == 1
    assert report["anatomical.nii"]["samples"] > 1
    assert sum(r.get("samples", 0) for r in report.values()) == \
        sum(s["samples"] for s in index["splits"].values())
    assert verify_shards(out) == []
    rgb = [json.loads(d) for _, n, d in members(out) if n.endswith(".json")]
    assert any(m["channels"] == 3 and m["intensity"] is None for m in rgb)
    logs = capfd.readouterr().err
    assert "quarantined" in logs and str(scans) not in logs
    # a 1% budget for bad files: the good file is still written, then exit 1
    few = tmp_path / "few"
    few.mkdir()
    for name in ("CT_small.dcm", "garbage.dcm"):
        shutil.copy(scans / name, few / name)
    strict = tmp_path / "strict"
    assert run_shard([few], strict, salt, "--max-bad", 0.01) == 1
    assert "more than --max-bad 0.01" in capfd.readouterr().err
    assert read_index(strict)["inputs"]["written"] == 1 and verify_shards(strict) == []


def test_file_failing_midway_is_quarantined_whole(monkeypatch, tmp_path, salt):
    import numpy as np

    from medssl.data import readers
    from medssl.data.sample import Slice

    def fake_read(path, *, axis, allow_burned_in, max_side, max_pixels):
        yield Slice(pixels=np.zeros((8, 8), np.int16), patient_id="x", source=str(path))
        if Path(path).name == "b.dcm":
            raise readers.Quarantine("truncated", "frame 2")
        if Path(path).name == "c.dcm":  # a bug outside the readers' own handling
            raise ValueError("header says Doe^Jane")
        yield Slice(pixels=np.ones((8, 8), np.int16), patient_id="x", source=str(path))

    monkeypatch.setattr(readers, "read_slices", fake_read)
    for name in ("a.dcm", "b.dcm", "c.dcm"):
        (tmp_path / name).write_bytes(b"x")
    out = tmp_path / "shards"
    # two of three lost is past the default --max-bad 0.5: exit 1, with a's samples written
    assert run_shard([tmp_path / n for n in ("a.dcm", "b.dcm", "c.dcm")], out, salt) == 1
    index = read_index(out)
    assert index["inputs"]["quarantined_by_reason"] == {"read_error": 1, "truncated": 1}
    report = (tmp_path / "shards.report.jsonl").read_text()
    assert '"detail": "ValueError"' in report and "Doe" not in report
    assert sum(s["samples"] for s in index["splits"].values()) == 2  # a.dcm's two, none of b
    assert index["modalities"] == {"unknown": 1}


def test_recipe_labels_become_cls_and_json(corpus, tmp_path, salt):
    import csv

    from medssl.data.deid import Pseudonymizer

    recipe = Path(__file__).resolve().parents[2] / "datasets" / "recipes" / "demo.yaml"
    out = tmp_path / "shards"
    assert run_shard([corpus], out, salt, "--recipe", recipe, "--shard-size", 7) == 0
    index = read_index(out)
    assert index["labels"] == {"type": "multiclass",
                               "names": ["none", "nodule", "effusion", "both"]}
    assert index["config"]["recipe"] == "demo"
    pseudo = Pseudonymizer(salt.read_bytes())
    expected = {}
    with open(corpus / "labels.csv") as f:
        for row in csv.DictReader(f):
            patient = pseudo.patient(row["patient_id"])
            key = pseudo.sample_key(patient, str((corpus / row["path"]).resolve()), 0)
            expected[key] = int(row["finding"])
    got_cls, got_json = {}, {}
    for _, name, data in members(out):
        key, ext = name.split(".", 1)
        if ext == "cls":
            got_cls[key] = int(data)
        elif ext == "json":
            got_json[key] = json.loads(data)["label"]
    assert got_cls == expected == got_json
    assert len(set(expected.values())) > 1  # the check can fail: labels differ across slices
    assert verify_shards(out) == []


def test_fast_png_encoder_round_trips_through_pil():
    import io

    import numpy as np
    from PIL import Image

    from medssl.data.sample import decode_image

    rng = np.random.default_rng(0)
    for shape in [(1, 1), (1, 9), (7, 13), (256, 256)]:
        image = rng.integers(0, 65536, shape, dtype=np.uint16)
        image.flat[0] = 65535
        png = sample_mod.encode_png16(image)
        np.testing.assert_array_equal(decode_image(png)[0], image)
        with Image.open(io.BytesIO(png)) as pil:  # PIL, the reference decoder
            assert pil.mode.startswith("I;16") and not pil.info
    strided = rng.integers(0, 65536, (40, 60), dtype=np.uint16)[::2, ::3]
    np.testing.assert_array_equal(decode_image(sample_mod.encode_png16(strided))[0], strided)
    flat = np.full((512, 512), 1234, np.uint16)
    assert len(sample_mod.encode_png16(flat)) < 0.01 * flat.nbytes  # it does compress


def test_recipe_rows_that_cannot_be_written_are_reported(corpus, tmp_path, salt):
    rows = (corpus / "labels.csv").read_text().splitlines()
    header, body = rows[0], rows[1:]
    cols = header.split(",")
    nodule = cols.index("nodule")

    def with_nodule(line, value):
        cells = line.split(",")
        cells[nodule] = value
        return ",".join(cells)

    body = [with_nodule(body[0], "-1"), with_nodule(body[1], "-1"), *body[2:],
            body[2].replace("IM0001.dcm", "IM9999.dcm")]
    manifest = tmp_path / "labels_u.csv"
    manifest.write_text("\n".join([header, *body]) + "\n")
    recipe = tmp_path / "u.yaml"
    recipe.write_text(
        f"name: uncertain\nmanifest: {manifest}\nformat: csv\nroot: {corpus}\n"
        "image_column: path\npatient_column: patient_id\n"
        "labels: {type: multilabel, columns: [nodule, effusion], names: [nodule, effusion],"
        " uncertain: ignore}\n")
    out = tmp_path / "shards"
    assert run_shard([corpus], out, salt, "--recipe", recipe) == 0
    index = read_index(out)
    assert index["inputs"]["seen"] == len(body)
    assert index["inputs"]["quarantined_by_reason"] == {"missing_file": 1, "uncertain_label": 2}
    assert sum(s["samples"] for s in index["splits"].values()) == len(body) - 3
    report = [json.loads(x) for x in (tmp_path / "shards.report.jsonl").read_text().splitlines()]
    assert [r.get("reason") for r in report[:2]] == ["uncertain_label"] * 2
    assert report[-1]["outcome"] == "quarantined" and report[-1]["path"].endswith("IM9999.dcm")
    labels = [json.loads(d)["label"] for _, n, d in members(out) if n.endswith(".json")]
    assert all(isinstance(v, list) and len(v) == 2 for v in labels)
    assert not any(n.endswith(".cls") for _, n, _ in members(out))  # multilabel: json only


def test_in_flight_work_is_bounded_and_order_kept(monkeypatch):
    from concurrent.futures import Future

    job = worker_mod.Job(salt=b"s" * 32, fractions={"train": 1.0}, axis="axial",
                        allow_burned_in=False, max_side=64, max_pixels=1 << 20)
    state = {"outstanding": 0, "peak": 0}

    class CountingFuture(Future):
        def result(self, timeout=None):
            state["outstanding"] -= 1
            return super().result(timeout)

    class FakePool:
        def __init__(self, max_workers, mp_context=None):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, chunk, job):
            state["outstanding"] += 1
            state["peak"] = max(state["peak"], state["outstanding"])
            fut = CountingFuture()
            fut.set_result([worker_mod.InputResult(it.index, "quarantined", reason="x")
                            for it in chunk])
            return fut

    monkeypatch.setattr(worker_mod, "ProcessPoolExecutor", FakePool)
    items = [worker_mod.InputItem(i, f"f{i}.dcm") for i in range(1000)]
    got = [r.index for r in worker_mod.iter_results(items, job, workers=3)]
    assert got == list(range(1000))
    assert state["peak"] <= 3 * worker_mod._TASKS_PER_WORKER
