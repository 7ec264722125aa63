"""Image-level leakage guard: windowed perceptual hash, Hamming index, cross-set pairs, report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from scipy import ndimage

from medssl.data.layout import FORMAT
from medssl.data.sample import encode_intensity, encode_png
from medssl.errors import MedsslError
from medssl.io import sha256_file
from medssl.leakage import DEFAULT_RADIUS, find_leaks, from_dict, to_dict, write_report
from medssl.leakage.index import HammingIndex
from medssl.leakage.phash import hamming, phash, unit_view
from medssl.sample import ShardSample

WINDOW = {"center": 40.0, "width": 400.0}


def _texture(seed: int, size: int = 96) -> np.ndarray:
    """A body-like HU image: a disk of smooth random tissue in air, different per seed."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), 4)
    field = field / field.std() * 120 + 40
    yy, xx = np.mgrid[0:size, 0:size]
    body = (yy - size / 2) ** 2 / (0.42 * size) ** 2 + (xx - size / 2) ** 2 / (0.46 * size) ** 2 < 1
    return np.where(body, field, -1000.0).astype(np.float32)


def _resized(hu: np.ndarray, scale: float) -> np.ndarray:
    h, w = hu.shape
    pil = Image.fromarray(np.ascontiguousarray(hu, np.float32), mode="F")
    return np.asarray(pil.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR))


def _rotated(hu: np.ndarray, degrees: float) -> np.ndarray:
    return ndimage.rotate(hu, degrees, reshape=False, order=1, mode="nearest")


def _sample(key: str, hu: np.ndarray, window=WINDOW, patient: str = "p-0") -> dict:
    stored, offset, slope = encode_intensity(np.rint(hu).astype(np.int32))
    meta = {"modality": "CT", "patient": patient, "channels": 1, "window": window,
            "intensity": {"offset": offset, "slope": slope, "unit": "HU"}}
    return {"__key__": key, "img.png": encode_png(stored), "json": json.dumps(meta).encode()}


def _folder(path, samples_by_split: dict[str, list[dict]]):
    path.mkdir(parents=True)
    shards = {}
    for split, samples in samples_by_split.items():
        name = f"{split}-000000.tar"
        with wds.TarWriter(str(path / name), encoder=False, mtime=0.0) as tw:
            for s in samples:
                tw.write(s)
        shards[name] = {"split": split, "samples": len(samples), "sha256": sha256_file(path / name)}
    index = {"format": FORMAT, "shards": shards,
             "splits": {s: {"samples": len(v)} for s, v in samples_by_split.items()}}
    (path / "index.json").write_text(json.dumps(index))
    return path


def _hash(hu: np.ndarray, window=WINDOW) -> np.ndarray:
    stored, offset, slope = encode_intensity(np.rint(hu).astype(np.int32))
    win = (float(window["center"]), float(window["width"])) if window else None
    return phash(unit_view(ShardSample("k", stored[None], offset=offset, slope=slope, window=win)))


def test_copies_are_close_and_unrelated_images_far():
    from medssl.data.synth import draw_patient

    # Copies: synthetic chest slices, what the radius was measured on (benchmarks/leakage.py).
    chests = [draw_patient(p, seed=0, slices=4, size=128).hu[k].astype(np.float32)
              for p in range(4) for k in (1, 3)]
    for b in chests:
        hb = _hash(b)
        assert int(hamming(_hash(b), hb)) == 0
        for copy in (_resized(b, 0.8), _resized(b, 1.4), _rotated(b, 4.0), _rotated(b, -5.0)):
            assert int(hamming(_hash(copy), hb)) <= DEFAULT_RADIUS
    # Unrelated: bodies of independent random tissue are far apart (the chests, all drawn from
    # one template, are not: the benchmark measures their false-positive rate instead).
    h = [_hash(_texture(s)) for s in range(12)]
    far = [int(hamming(h[i], h[j])) for i in range(len(h)) for j in range(i)]
    assert min(far) > 2 * DEFAULT_RADIUS


def test_hash_is_taken_in_the_window_not_an_8bit_clip():
    size = 96
    yy, xx = np.mgrid[0:size, 0:size]
    disk = (yy - 48) ** 2 + (xx - 48) ** 2 < 40 ** 2
    a = np.where(disk, 40.0, -1000.0)
    a[:4, :4] = 3000.0                                    # bone-bright corner: stored range ~4,000 HU
    narrow = {"center": 40.0, "width": 60.0}
    # (1) Differences only outside the window are invisible to a reader, and to the hash.
    outside = a.copy()
    outside[~disk & (xx > 60)] = -700.0                   # air changed, still far below -10 HU
    assert int(hamming(_hash(a, narrow), _hash(outside, narrow))) == 0
    # (2) A low-contrast pattern inside the window (+-6 HU, a tenth of the window) tells the two
    # apart; squeezed to 8 bits over the stored range (16 HU a level) it all but vanishes.
    pattern = np.where(disk, 6.0 * np.sign(np.sin(xx / 9.0) * np.sin(yy / 7.0)), 0.0)
    b = a + pattern
    assert int(hamming(_hash(a, narrow), _hash(b, narrow))) > DEFAULT_RADIUS

    def clip8(hu):
        stored, _, _ = encode_intensity(np.rint(hu).astype(np.int32))
        return phash((stored >> 8).astype(np.float32) / 255.0)

    assert int(hamming(clip8(a), clip8(b))) < int(hamming(_hash(a, narrow), _hash(b, narrow))) / 4


def test_index_matches_brute_force_and_radius_is_inclusive():
    rng = np.random.default_rng(0)
    db = rng.integers(0, 256, (500, 8), dtype=np.uint8)
    q = db[:40].copy()
    q[:, 0] ^= rng.integers(0, 256, 40, dtype=np.uint8)   # up to 8 bits away from their source
    for radius in (0, 4, 20, 28):
        rows, items, dist = HammingIndex(db).within(q, radius)
        full = hamming(q[:, None], db[None])
        want = set(zip(*np.nonzero(full <= radius)))
        assert set(zip(rows.tolist(), items.tolist())) == want
        assert all(full[r, i] == d for r, i, d in zip(rows, items, dist))


def test_find_leaks_pairs_keys_and_report_holds_no_path(tmp_path):
    pre = [_sample(f"pre{i:02d}", _texture(i), patient=f"p-pre{i}") for i in range(10)]
    pre.append(_sample("copy-rot", _rotated(_texture(101), 3.0)))
    pre.append(_sample("copy-small", _resized(_texture(102), 0.7)))
    pre.append(_sample("blank-pre", np.full((64, 64), -1000.0)))
    task = {"test": [_sample(f"t{i}", _texture(100 + i)) for i in range(6)]
            + [_sample("blank-task", np.full((64, 64), -1000.0))],
            "train": [_sample("t-train-same", _texture(5))]}
    pdir = _folder(tmp_path / "PAT-Zorquil^Ottoline" / "pretrain", {"train": pre})
    tdir = _folder(tmp_path / "2024-01-02-ACC123" / "task", task)
    result = find_leaks(pdir, tdir)
    found = {(p.task_key, p.pretrain_key) for p in result.pairs}
    assert found == {("t1", "copy-rot"), ("t2", "copy-small"), ("t-train-same", "pre05")}
    assert result.matched == {"test": 2, "train": 1}
    assert result.blank == {"pretrain": 1, "task": 1}   # flat images never pair with each other
    assert result.task_samples == {"test": 7, "train": 1}
    assert from_dict(json.loads(json.dumps(to_dict(result)))) == result
    js, md = write_report(result, tmp_path / "out")
    for text in (js.read_text(), md.read_text()):
        assert "copy-rot" in text
        for leak in ("Zorquil", "Ottoline", "ACC123", str(tmp_path)):
            assert leak not in text
    assert "2 task image(s)" not in md.read_text() and "3 task image(s)" in md.read_text()
    only_test = find_leaks(pdir, tdir, task_splits=["test"])
    assert only_test.matched == {"test": 2}


def test_encoder_adds_pairs_the_hash_misses(tmp_path):
    pre = [_sample("copy", _resized(_texture(7), 0.6))] + [
        _sample(f"other{i}", _texture(200 + i)) for i in range(4)]
    pdir = _folder(tmp_path / "pre", {"train": pre})
    tdir = _folder(tmp_path / "task", {"test": [_sample("src", _texture(7))]})

    def thumbs(views: np.ndarray) -> np.ndarray:   # [B, 1, S, S] -> [B, 64], zero-mean
        small = views[:, 0].reshape(len(views), 8, 8, 8, 8).mean(axis=(2, 4)).reshape(len(views), -1)
        return small - small.mean(axis=1, keepdims=True)

    hash_only = find_leaks(pdir, tdir, radius=0)
    assert hash_only.pairs_total == 0
    both = find_leaks(pdir, tdir, radius=0, encoder=thumbs, min_cosine=0.98)
    assert [(p.task_key, p.pretrain_key) for p in both.pairs] == [("src", "copy")]
    assert both.pairs[0].cosine >= 0.98 and both.pairs[0].hamming > 0


def test_bad_input_is_refused_before_work(tmp_path):
    good = _folder(tmp_path / "good", {"train": [_sample("a", _texture(1))]})
    with pytest.raises(MedsslError, match="no such shard folder"):
        find_leaks(tmp_path / "missing", good)
    with pytest.raises(MedsslError, match="radius"):
        find_leaks(good, good, radius=300)
    with pytest.raises(MedsslError, match="split"):
        find_leaks(good, good, task_splits=["test"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "leakage.json").write_text('{"someone": "else"}')
    with pytest.raises(MedsslError, match="not a medssl leakage report"):
        write_report(find_leaks(good, good), tmp_path / "out")


def test_leakage_command_exit_status_and_one_result_line(tmp_path, capsys):
    from medssl.cli import main

    pre = [_sample(f"pre{i}", _texture(i)) for i in range(5)]
    pre.append(_sample("copy", _rotated(_texture(300), 3.0)))
    pdir = _folder(tmp_path / "pre", {"train": pre})
    clean = _folder(tmp_path / "clean", {"test": [_sample("c0", _texture(400))],
                                         "val": [_sample("c1", _texture(401))]})
    leaky = _folder(tmp_path / "leaky", {"test": [_sample("t0", _texture(300)),
                                                  _sample("t1", _texture(402))],
                                         "train": [_sample("t2", _texture(2))]})
    assert main(["leakage", str(pdir), str(clean), "--out", str(tmp_path / "r0")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("leakage: 0 of 2 task images (test+val)") and "\n" not in line
    assert main(["leakage", str(pdir), str(leaky), "--out", str(tmp_path / "r1")]) == 1
    line = capsys.readouterr().out.strip()
    assert line.startswith("leakage: 1 of 2 task images (test)")   # train was not asked for
    report = json.loads((tmp_path / "r1" / "leakage.json").read_text())
    assert [(p["task_key"], p["pretrain_key"]) for p in report["pairs"]] == [("t0", "copy")]
    # one folder for both: its test split against itself is refused; against train it runs
    assert main(["leakage", str(leaky), str(leaky), "--out", str(tmp_path / "r2")]) == 2
    assert main(["leakage", str(leaky), str(leaky), "--pretrain-splits", "train",
                 "--out", str(tmp_path / "r2")]) == 0
    assert main(["leakage", str(pdir), str(clean), "--splits", "val,test2",
                 "--out", str(tmp_path / "r3")]) == 2


def test_volume_shards_are_refused_by_the_2d_image_check(tmp_path):
    """No 3-D hash is calibrated: a volume folder is refused in one line, before any reading."""
    from medssl.errors import MedsslError
    from medssl.leakage.scan import hash_folder

    folder = tmp_path / "volumes"
    folder.mkdir()
    (folder / "index.json").write_text(json.dumps({
        "format": FORMAT, "shards": {"train-000000.tar": {"split": "train", "samples": 1}},
        "config": {"volumes": True, "spacing": [1.5, 1.5, 2.0]}}))
    with pytest.raises(MedsslError, match="near-duplicate image check is 2-D only") as err:
        hash_folder(folder)
    assert "\n" not in str(err.value)
