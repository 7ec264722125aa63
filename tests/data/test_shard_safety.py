"""`medssl shard` on hostile inputs and wrong commands: every bad input becomes a report line
with a reason, every wrong command a one-line refusal, and nothing on disk is lost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from medssl.cli import main
from medssl.data import hostile
from medssl.data.shards import read_index
from medssl.data.verify import verify_shards
from medssl.lock import LOCK_NAME

CT = Path(get_testdata_file("CT_small.dcm"))


def shard(inputs, out, *extra, salt=None) -> int:
    salt_args = ["--salt-file", str(salt)] if salt is not None else []
    return main(["shard", *map(str, inputs), "--out", str(out), *salt_args,
                 "--splits", "train=0.5,val=0.25,test=0.25", *map(str, extra)])


def report(out: Path) -> dict[str, dict]:
    lines = (out.parent / f"{out.name}.report.jsonl").read_text().splitlines()
    return {Path(r["path"]).name: r for r in map(json.loads, lines)}


def errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if "ERROR" in line]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (the lock aside: each run that takes it rewrites it)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}


def good_scans(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        shutil.copy(CT, folder / f"good{i}.dcm")


# ---------------------------------------------------------------- 1. decompression bombs

def test_bombs_quarantined_too_large_good_files_written(tmp_path, salt, capfd):
    scans = tmp_path / "scans"
    good_scans(scans, 4)
    hostile.rle_bomb(scans / "rle.dcm")                        # 60000 x 60000 in ~700 bytes
    hostile.deflate_bomb(scans / "deflate.dcm", 4000, 4000)    # 32 MB of zeros inflated
    hostile.png_bomb(scans / "bomb.png")
    hostile.nifti_bomb(scans / "bomb.nii")
    hostile.multiframe(scans / "tomo.dcm", 600, 500, 5)        # 5x the budget, frame by frame
    out = tmp_path / "shards"
    assert shard([scans], out, "--max-pixels", 600 * 500, "--workers", 2, salt=salt) == 0
    lines = report(out)
    for name in ("rle.dcm", "deflate.dcm", "bomb.png", "bomb.nii"):
        assert lines[name]["outcome"] == "quarantined" and lines[name]["reason"] == "too_large"
    assert "60000x60000x1 frame" in lines["rle.dcm"]["detail"]
    assert "inflates past" in lines["deflate.dcm"]["detail"]
    assert lines["tomo.dcm"] == {"path": str(scans / "tomo.dcm"), "outcome": "written",
                                 "samples": 5}
    index = read_index(out)
    assert index["inputs"]["quarantined_by_reason"] == {"too_large": 4}
    assert index["config"]["max_pixels"] == 600 * 500
    assert sum(s["samples"] for s in index["splits"].values()) == 4 + 5
    assert verify_shards(out) == []
    assert "quarantined (too_large 4)" in capfd.readouterr().out


# ---------------------------------------------------------------- 2. input discovery

def test_loops_unreadable_folders_links_and_odd_names_are_report_lines(tmp_path, salt,
                                                                         monkeypatch):
    scans = tmp_path / "scans"
    good_scans(scans / "real", 2)
    (scans / "a.dcm").symlink_to(scans / "b.dcm")
    (scans / "b.dcm").symlink_to(scans / "a.dcm")
    outside = tmp_path / "outside"
    good_scans(outside, 1)
    (scans / "linked").symlink_to(outside, target_is_directory=True)
    (scans / "locked").mkdir()
    shutil.copy(CT, scans / "locked" / "hidden_from_us.dcm")
    odd = os.fsdecode(b"scan_\xe9t\xe9.dcm")  # a Latin-1 name: not valid UTF-8
    shutil.copy(CT, scans / odd)
    locked = str(scans / "locked")
    real_scandir, real_stat = os.scandir, os.stat

    def deny(path):  # tests run as root, where chmod 000 stops nothing: deny by hand
        if str(path) == locked or str(path).startswith(locked + os.sep):
            raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "scandir", lambda p=".": (deny(p), real_scandir(p))[1])
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: (deny(p), real_stat(p, *a, **k))[1])
    out = tmp_path / "shards"
    assert shard([scans], out, salt=salt) == 0
    monkeypatch.undo()
    lines = {Path(r["path"]).relative_to(scans).as_posix(): r for r in
             map(json.loads, (tmp_path / "shards.report.jsonl").read_text().splitlines())}
    assert {k: v.get("reason") for k, v in lines.items() if v["outcome"] == "quarantined"} == \
        {"a.dcm": "unreadable", "b.dcm": "unreadable", "locked": "unreadable"}
    # the symlinked folder is followed; the odd name is written under its exact name
    assert {k for k, v in lines.items() if v["outcome"] == "written"} == \
        {"real/good0.dcm", "real/good1.dcm", "linked/good0.dcm", odd}
    assert read_index(out)["inputs"] == {
        "seen": 7, "written": 4, "quarantined": 3, "quarantined_by_reason": {"unreadable": 3},
        "skipped_slices_by_reason": {}}


# ---------------------------------------------------------------- 3. zero output fails

def test_no_sample_written_fails_whatever_max_bad(tmp_path, salt, capfd):
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(3):
        (scans / f"junk{i}.dcm").write_bytes(os.urandom(2048))
    assert shard([scans], tmp_path / "shards", "--max-bad", 1, salt=salt) == 1
    (line,) = errors(capfd.readouterr().err)
    assert "no samples written: 3 of 3 inputs quarantined (unreadable 3)" in line


def test_default_max_bad_fails_a_run_that_lost_most_inputs(tmp_path, salt, capfd):
    scans = tmp_path / "scans"
    good_scans(scans, 1)
    for i in range(2):
        (scans / f"junk{i}.dcm").write_bytes(os.urandom(2048))
    assert shard([scans], tmp_path / "most_lost", salt=salt) == 1
    (line,) = errors(capfd.readouterr().err)
    assert "2 of 3 inputs lost (66.7%), more than --max-bad 0.5" in line
    good_scans(scans, 3)
    assert shard([scans], tmp_path / "some_lost", salt=salt) == 0  # 2 of 5
    assert not errors(capfd.readouterr().err)


def test_label_policy_drops_are_not_losses(tmp_path, salt):
    from medssl.data.synth import write_corpus

    corpus = tmp_path / "corpus"
    write_corpus(corpus, patients=4, slices=2, size=32, seed=0)
    rows = (corpus / "labels.csv").read_text().splitlines()
    header, body = rows[0], rows[1:]
    nodule = header.split(",").index("nodule")

    def uncertain(line):
        cells = line.split(",")
        cells[nodule] = "-1"
        return ",".join(cells)

    body = [uncertain(r) for r in body[:6]] + body[6:]  # 6 of 8 rows dropped on purpose
    manifest = tmp_path / "labels_u.csv"
    manifest.write_text("\n".join([header, *body]) + "\n")
    recipe = tmp_path / "u.yaml"
    recipe.write_text(
        f"name: uncertain\nmanifest: {manifest}\nformat: csv\nroot: {corpus}\n"
        "image_column: path\npatient_column: patient_id\n"
        "labels: {type: multilabel, columns: [nodule, effusion], names: [nodule, effusion],"
        " uncertain: ignore}\n")
    assert shard([corpus], tmp_path / "dropped", "--recipe", recipe, salt=salt) == 0
    assert read_index(tmp_path / "dropped")["inputs"]["quarantined_by_reason"] == \
        {"uncertain_label": 6}
    # the same 6 rows naming files that do not exist are losses
    missing = [r.replace(".dcm", "_gone.dcm") for r in rows[1:7]] + rows[7:]
    manifest.write_text("\n".join([header, *missing]) + "\n")
    assert shard([corpus], tmp_path / "missing", "--recipe", recipe, salt=salt) == 1


# ---------------------------------------------------------------- 4. damaged shard folder

@pytest.mark.parametrize("damage, fragment", [
    ("delete", "train-000000.tar is listed in index.json but missing"),
    ("flip", "train-000000.tar differs from its sha256 in index.json"),
    ("cut", "train-000000.tar is 1000 bytes, index.json says"),
    ("extra", "holds train-000099.tar, which index.json does not list"),
])
def test_damaged_folder_is_refused_naming_the_shard(tmp_path, salt, capfd, damage, fragment):
    scans = tmp_path / "scans"
    good_scans(scans, 6)
    out = tmp_path / "shards"
    assert shard([scans], out, "--shard-size", 1, "--splits", "train=1", salt=salt) == 0
    index = read_index(out)
    assert all(info["bytes"] == (out / name).stat().st_size
               for name, info in index["shards"].items())
    first = out / "train-000000.tar"
    if damage == "delete":
        first.unlink()
    elif damage == "flip":
        data = bytearray(first.read_bytes())
        data[700] ^= 0xFF
        first.write_bytes(bytes(data))
    elif damage == "cut":
        first.write_bytes(first.read_bytes()[:1000])
    else:
        shutil.copy(first, out / "train-000099.tar")
    before = snapshot(tmp_path)
    capfd.readouterr()
    assert shard([scans], out, "--shard-size", 1, "--splits", "train=1", salt=salt) == 2
    logs = capfd.readouterr()
    (line,) = [x for x in logs.err.splitlines() if x.strip()]
    assert fragment in line
    assert "already complete" not in logs.out
    assert snapshot(tmp_path) == before


def test_index_without_shard_sizes_still_reads_and_checks(tmp_path, salt, capfd):
    scans = tmp_path / "scans"
    good_scans(scans, 2)
    out = tmp_path / "shards"
    assert shard([scans], out, salt=salt) == 0
    index = json.loads((out / "index.json").read_text())
    for info in index["shards"].values():
        del info["bytes"]  # an index written before sizes were recorded
    (out / "index.json").write_text(json.dumps(index))
    capfd.readouterr()
    assert shard([scans], out, salt=salt) == 0
    assert "already complete" in capfd.readouterr().out
    assert verify_shards(out) == []


# ---------------------------------------------------------------- 5. one bad slice

def test_all_nan_slice_is_skipped_not_the_volume_and_stderr_stays_clean(tmp_path, salt):
    volume = np.random.default_rng(0).normal(100, 20, (16, 12, 6)).astype(np.float32)
    volume[:, :, 2] = np.nan          # one slice with nothing finite: skipped
    volume[3:5, 3:5, 4] = np.inf      # a few bad voxels: the slice is kept
    scans = tmp_path / "scans"
    scans.mkdir()
    nib.save(nib.Nifti1Image(volume, np.eye(4)), scans / "case01.nii.gz")
    out = tmp_path / "shards"
    proc = subprocess.run([sys.executable, "-m", "medssl", "shard", str(scans), "--out", str(out),
                           "--salt-file", str(salt), "--splits", "train=1"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr and "invalid value" not in proc.stderr, proc.stderr
    assert report(out)["case01.nii.gz"] == {
        "path": str(scans / "case01.nii.gz"), "outcome": "written", "samples": 5,
        "skipped": {"non_finite_slice": [2]}}
    index = read_index(out)
    assert index["inputs"]["skipped_slices_by_reason"] == {"non_finite_slice": 1}
    assert index["inputs"]["quarantined"] == 0 and index["splits"]["train"]["samples"] == 5
    assert "1 slices skipped" in proc.stdout


# ---------------------------------------------------------------- 6. nothing left behind

def test_refused_runs_leave_nothing_behind(tmp_path, salt, capfd, monkeypatch):
    scans = tmp_path / "scans"
    good_scans(scans, 2)
    out = tmp_path / "shards"
    assert shard([scans], out, salt=tmp_path / "no_such.salt") == 2
    assert "salt file not found" in capfd.readouterr().err
    assert shard([tmp_path / "nothing_here"], out, salt=salt) == 2
    assert shard([scans], out, "--max-pixels", 0, salt=salt) == 2
    assert not out.exists()
    # made with --salt-file, re-run without it: refused, and no stray <out>.salt
    assert shard([scans], out, salt=salt) == 0
    before = snapshot(tmp_path)
    capfd.readouterr()
    monkeypatch.delenv("MEDSSL_SALT", raising=False)
    assert shard([scans], out) == 2
    (line,) = [x for x in capfd.readouterr().err.splitlines() if x.strip()]
    assert "different settings (salt_id:" in line
    assert not (tmp_path / "shards.salt").exists()
    assert snapshot(tmp_path) == before
    # a folder holding someone else's shards: refused before a salt is created for it
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "train-000000.tar").write_bytes(b"not ours")
    assert shard([scans], foreign) == 2
    assert "holds shards (train-000000.tar, ...)" in capfd.readouterr().err
    assert not (tmp_path / "foreign.salt").exists()
    assert (foreign / "train-000000.tar").read_bytes() == b"not ours"
    # a first run with no salt anywhere creates <out>.salt beside the folder, private
    fresh = tmp_path / "fresh"
    assert shard([scans], fresh) == 0
    assert (tmp_path / "fresh.salt").stat().st_mode & 0o777 == 0o600


def test_out_that_is_a_file_is_refused(tmp_path, salt, capfd):
    good_scans(tmp_path / "scans", 1)
    (tmp_path / "shards").write_text("mine")
    assert shard([tmp_path / "scans"], tmp_path / "shards", salt=salt) == 2
    assert "is a file" in capfd.readouterr().err
    assert (tmp_path / "shards").read_text() == "mine"


# ---------------------------------------------------------------- 10. lock

HOLD = ("import sys, time; from medssl.lock import FolderLock; FolderLock(sys.argv[1]).acquire();"
        " print('held', flush=True); time.sleep(60)")


def test_second_shard_into_a_held_folder_refuses_in_one_line(tmp_path, salt, capfd):
    scans = tmp_path / "scans"
    good_scans(scans, 2)
    out = tmp_path / "shards"
    assert shard([scans], out, salt=salt) == 0
    (out / "train-000000.tar.tmp").write_bytes(b"the holder's work in progress")
    before = snapshot(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capfd.readouterr()
        assert shard([scans], out, salt=salt) == 2
        (line,) = [x for x in capfd.readouterr().err.splitlines() if x.strip()]
        assert "shard folder is in use by" in line and f"pid {holder.pid}" in line
        assert snapshot(tmp_path) == before  # the holder's temp file survived
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_worker_is_one_line_and_the_run_resumes(tmp_path, salt, capfd, monkeypatch):
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    from medssl.data import worker

    scans = tmp_path / "scans"
    good_scans(scans, 12)
    real_pool = worker.ProcessPoolExecutor
    calls = []

    class DyingPool:  # the third task's worker is killed (the OOM killer, say)
        def __init__(self, max_workers, mp_context=None):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, chunk, job):
            fut = Future()
            calls.append(1)
            if len(calls) == 3:
                fut.set_exception(BrokenProcessPool("A process in the pool was terminated"))
            else:
                fut.set_result(fn(chunk, job))
            return fut

    monkeypatch.setattr(worker, "ProcessPoolExecutor", DyingPool)
    out = tmp_path / "shards"
    assert shard([scans], out, "--workers", 2, "--shard-size", 2, salt=salt) == 2
    (line,) = [x for x in capfd.readouterr().err.splitlines() if x.strip()]
    assert "a shard worker died while reading input #8" in line and "re-run" in line
    assert not (out / "index.json").exists()
    monkeypatch.setattr(worker, "ProcessPoolExecutor", real_pool)
    assert shard([scans], out, "--workers", 2, "--shard-size", 2, salt=salt) == 0
    assert read_index(out)["inputs"]["written"] == 12 and verify_shards(out) == []
