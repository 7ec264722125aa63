"""``medssl shard --masks-out``: finding masks joined to sample keys, beside the shards."""

from __future__ import annotations

import csv
import json
import tarfile
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest

from finetune.explain_masks import load_masks
from medssl.cli import main
from medssl.data import shard as shard_mod
from medssl.data.synth import canary_strings, write_corpus
from medssl.sample import read_sample

SPLITS = "train=0.5,val=0.25,test=0.25"
RECIPE = Path(__file__).resolve().parents[2] / "datasets" / "recipes" / "demo.yaml"


class Interrupt(BaseException):
    """Stands in for SIGINT at a chosen point of the writer."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("masks") / "scans"
    write_corpus(out, patients=6, slices=3, size=64, seed=2)
    return out


@pytest.fixture
def recipe(tmp_path) -> Path:
    """demo.yaml, which names the synth corpus's mask column."""
    assert "\nmasks: mask" in RECIPE.read_text()
    return RECIPE


def _without_masks(tmp_path) -> Path:
    """demo.yaml with its masks: key taken out."""
    path = tmp_path / "demo_no_masks.yaml"
    lines = [line for line in RECIPE.read_text().splitlines() if not line.startswith("masks:")]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_shard(corpus, out, salt, *extra) -> int:
    return main(["shard", str(corpus), "--out", str(out), "--salt-file", str(salt),
                 "--splits", SPLITS, "--shard-size", "4", *map(str, extra)])


def shard_samples(out: Path) -> dict:
    raw: dict[str, dict] = defaultdict(dict)
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar:
                key, member = m.name.split(".", 1)
                raw[key][member] = tar.extractfile(m).read()
                raw[key]["__key__"] = key
    return {k: read_sample(v) for k, v in raw.items()}


def truth(corpus: Path) -> dict[bytes, np.ndarray]:
    """Stored HU bytes of each slice -> its finding mask (from labels.csv and masks/)."""
    from PIL import Image

    out = {}
    with (corpus / "labels.csv").open() as fh:
        for row in csv.DictReader(fh):
            ds = pydicom.dcmread(corpus / row["path"])
            hu = ds.pixel_array.astype(np.int32) + int(ds.RescaleIntercept)
            mask = (np.asarray(Image.open(corpus / row["mask"])) > 0 if row["mask"]
                    else np.zeros(hu.shape, bool))
            out[hu.astype(np.int16).tobytes()] = mask
    return out


def hu_of(sample) -> np.ndarray:
    return np.asarray(sample.image, np.float64)[0] * sample.slope + sample.offset  # [1, H, W]


def test_masks_out_keys_are_the_sample_keys_and_masks_cover_the_findings(corpus, recipe, salt,
                                                                            tmp_path):
    out, masks_file = tmp_path / "shards", tmp_path / "masks.npz"
    assert run_shard(corpus, out, salt, "--recipe", recipe, "--masks-out", masks_file) == 0
    samples = shard_samples(out)
    with np.load(masks_file, allow_pickle=False) as data:
        masks = {k: data[k] for k in data.files}
    assert set(masks) == set(samples) and len(masks) == 18
    by_pixels = truth(corpus)
    found = 0
    for key, sample in samples.items():
        hu = hu_of(sample)
        expected = by_pixels[np.rint(hu).astype(np.int16).tobytes()]
        mask = masks[key]
        assert mask.dtype == bool and mask.shape == hu.shape
        np.testing.assert_array_equal(mask, expected)
        finding = sample.label != 0  # demo.yaml: finding 0 = none
        assert mask.any() == finding  # a slice without a finding has an empty mask
        if finding:
            found += 1
            # The mask covers the bright finding (soft tissue or fluid, at least half of each
            # pixel at its anti-aliased edge) where the lung around it is dark.
            assert hu[mask].min() > -600
            assert np.median(hu[mask]) > np.median(hu[(hu < -600)]) + 300
    assert found > 3
    # What the benchmark reads: the same keys and masks, and nothing but keys in the file.
    source = load_masks(masks_file)
    assert len(source) == 18 and set(source.masks) == set(samples)
    names = zipfile.ZipFile(masks_file).namelist()
    assert all(n.startswith("p-") and n.endswith(".npy") and "/" not in n for n in names)
    blob = masks_file.read_bytes()
    assert b"PAT-" not in blob and b"FAKEMRN" not in blob and b"Infirmary" not in blob
    # No identity reaches the shards, their index or the masks file: names, dates, UIDs, and
    # the sites' hospital, address and station names (canaries since sites exist).
    outputs = b"".join(p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()) + blob
    for patient in range(6):
        for canary in canary_strings(patient, seed=2, slices=3, size=64):
            assert canary.encode() not in outputs, canary
    assert not list(out.glob("*.npz")) and not list(out.glob("*.png"))
    # Masks change nothing in the shards: the same bytes as a run without them.
    plain = tmp_path / "plain"
    assert run_shard(corpus, plain, salt, "--recipe", recipe) == 0
    assert {p.name: p.read_bytes() for p in plain.glob("*.tar")} == \
        {p.name: p.read_bytes() for p in out.glob("*.tar")}


def test_masks_follow_the_image_through_max_side(corpus, recipe, salt, tmp_path):
    out, masks_file = tmp_path / "small", tmp_path / "small.npz"
    assert run_shard(corpus, out, salt, "--recipe", recipe, "--masks-out", masks_file,
                     "--max-side", 32) == 0
    samples = shard_samples(out)
    with np.load(masks_file) as data:
        masks = {k: data[k] for k in data.files}
    assert set(masks) == set(samples)
    inside, outside = [], []
    for key, sample in samples.items():
        hu = hu_of(sample)
        assert masks[key].shape == hu.shape == (32, 32)
        assert masks[key].any() == (sample.label != 0)
        if masks[key].any():
            inside.append(np.median(hu[masks[key]]))
            lung = (hu < -600) & ~masks[key]
            outside.append(np.median(hu[lung]) if lung.any() else -1000)
    assert inside and min(inside) > -550 and max(outside) < -600


def test_resumed_and_finished_runs_still_write_every_mask(corpus, recipe, salt, tmp_path,
                                                          monkeypatch):
    reference, ref_masks = tmp_path / "ref", tmp_path / "ref.npz"
    assert run_shard(corpus, reference, salt, "--recipe", recipe, "--masks-out", ref_masks) == 0
    out, masks_file = tmp_path / "resumed", tmp_path / "resumed.npz"
    real = shard_mod.SplitWriter.close
    calls = []

    def dying_close(self):
        real(self)
        calls.append(1)
        if len(calls) == 2:
            raise Interrupt

    monkeypatch.setattr(shard_mod.SplitWriter, "close", dying_close)
    with pytest.raises(Interrupt):
        run_shard(corpus, out, salt, "--recipe", recipe, "--masks-out", masks_file)
    monkeypatch.undo()
    assert not masks_file.exists() and not (out / "index.json").exists()
    assert run_shard(corpus, out, salt, "--recipe", recipe, "--masks-out", masks_file) == 0
    assert masks_file.read_bytes() == ref_masks.read_bytes()  # same bytes as an uninterrupted run
    # A finished folder asked for masks later gets them all, and a re-run leaves them alone.
    later = tmp_path / "later.npz"
    assert run_shard(corpus, out, salt, "--recipe", recipe, "--masks-out", later) == 0
    assert later.read_bytes() == ref_masks.read_bytes()
    before = later.stat().st_mtime_ns
    assert run_shard(corpus, out, salt, "--recipe", recipe, "--masks-out", later) == 0
    assert later.stat().st_mtime_ns == before


@pytest.mark.parametrize("case", ["foreign", "inside", "suffix", "no_column", "other_run"])
def test_masks_out_refusals_name_the_file_before_any_work(case, corpus, recipe, salt, tmp_path,
                                                          capfd):
    out = tmp_path / "shards"
    target = tmp_path / "masks.npz"
    extra = ["--recipe", recipe]
    if case == "foreign":
        target.write_bytes(b"someone's results")
        match = "was not written by medssl shard"
    elif case == "inside":
        target = out / "masks.npz"
        match = "inside the shard folder"
    elif case == "suffix":
        target = tmp_path / "masks.csv"
        match = "name a .npz file"
    elif case == "no_column":
        extra = ["--recipe", _without_masks(tmp_path)]
        match = "needs a --recipe whose masks: key"
    else:
        other = tmp_path / "other"
        assert run_shard(corpus, other, salt, *extra, "--masks-out", target, "--max-side", 32) == 0
        capfd.readouterr()
        match = "holds the masks of another shard run"
    before = target.read_bytes() if target.exists() else None
    assert run_shard(corpus, out, salt, *extra, "--masks-out", target) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0] and str(target.name) in err[0]
    assert not out.exists()  # refused before the folder was made
    assert (target.read_bytes() if target.exists() else None) == before


def test_a_bad_mask_quarantines_its_image_and_says_why(corpus, salt, tmp_path):
    scans = tmp_path / "scans"
    write_corpus(scans, patients=2, slices=2, size=32, seed=2)
    rows = (scans / "labels.csv").read_text().splitlines()
    header = rows[0].split(",")
    broken = next(i for i, r in enumerate(rows[1:], 1) if r.split(",")[header.index("mask")])
    cells = rows[broken].split(",")
    (scans / cells[header.index("mask")]).write_bytes(b"not a png")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_without_masks(tmp_path).read_text().replace("\nlabels:", "\nmasks: mask\nlabels:", 1))
    out = tmp_path / "out"
    assert run_shard(scans, out, salt, "--recipe", recipe, "--masks-out", tmp_path / "m.npz") == 0
    report = [json.loads(line) for line in (tmp_path / "out.report.jsonl").read_text().splitlines()]
    bad = [r for r in report if r["outcome"] == "quarantined"]
    assert len(bad) == 1 and bad[0]["reason"] == "bad_mask" and "mask unreadable" in bad[0]["detail"]
    with np.load(tmp_path / "m.npz") as data:
        assert len(data.files) == len(rows) - 2  # every written sample but the quarantined one


def test_recipe_masks_key_is_checked_and_masks_are_never_scans(corpus, tmp_path):
    from medssl.data import readers
    from medssl.data.recipes import load_recipe
    from medssl.errors import ConfigError, MedsslError

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmanifest: null\nmasks: mask\n")
    with pytest.raises(ConfigError, match="masks: names a manifest column"):
        load_recipe(bad)
    missing = tmp_path / "missing.yaml"
    missing.write_text(_without_masks(tmp_path).read_text().replace("\nlabels:", "\nmasks: outline\nlabels:", 1))
    with pytest.raises(MedsslError, match=r"labels.csv: no column 'outline'.*key masks"):
        load_recipe(missing).manifest_entries([corpus])
    entries = load_recipe(missing.parent / "missing.yaml").labels_info()
    assert entries is not None  # the labels are untouched by the masks key
    good = tmp_path / "good.yaml"
    good.write_text(_without_masks(tmp_path).read_text().replace("\nlabels:", "\nmasks: mask\nlabels:", 1))
    rows = load_recipe(good).manifest_entries([corpus])
    with_mask = [e for e in rows if e.mask is not None]
    assert with_mask and all(e.mask.is_file() and e.mask.name.endswith(".mask.png") for e in with_mask)
    assert all((e.mask is None) == (e.label == 0) for e in rows)
    # A folder walk (no recipe: pretraining) finds the slices, never the masks beside them.
    found = readers.discover([corpus])
    assert len(found) == 18 and not any(f.path.name.endswith(".mask.png") for f in found)
