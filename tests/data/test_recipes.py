"""Dataset recipes: every shipped recipe against a tiny manifest, label policies, clear errors."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import pytest
import yaml

from medssl.data.recipes import load_recipe
from medssl.data.synth import write_corpus
from medssl.errors import ConfigError, MedsslError

RECIPES = Path(__file__).resolve().parents[2] / "datasets" / "recipes"

CHEXPERT_OBS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
]
NIH = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
       "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
       "Hernia"]


def _variant(tmp_path: Path, name: str, **changes) -> Path:
    """A copy of a shipped recipe with some keys changed (``labels`` merged, not replaced)."""
    tree = yaml.safe_load((RECIPES / name).read_text())
    for key, value in changes.items():
        if key == "labels":
            tree["labels"].update(value)
        else:
            tree[key] = value
    path = tmp_path / f"variant-{name}"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def _write_recipe(tmp_path: Path, tree: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_every_shipped_recipe_loads(name):
    recipe = load_recipe(RECIPES / name)
    assert recipe.name == Path(name).stem
    info = recipe.labels_info()
    if recipe.manifest is None:
        assert info is None
    else:
        assert info["type"] in ("multiclass", "binary", "multilabel") and len(info["names"]) >= 2


# ---------------------------------------------------------------- demo corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("recipes") / "corpus"
    write_corpus(out, patients=3, slices=3, size=32, seed=1)
    return out


def test_demo_recipe_reads_the_synthetic_corpus(corpus):
    recipe = load_recipe(RECIPES / "demo.yaml")
    entries = recipe.manifest_entries([corpus])
    with (corpus / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(entries) == len(rows) == 9
    for entry, row in zip(entries, rows):
        assert entry.path == corpus / row["path"] and entry.path.is_file()
        assert entry.patient_id == row["patient_id"]
        assert entry.label == int(row["finding"]) and isinstance(entry.label, int)
        assert entry.split is None and entry.quarantine is None and entry.slice is None
    assert recipe.labels_info() == {"type": "multiclass", "names": ["none", "nodule", "effusion", "both"]}
    multi = load_recipe(RECIPES / "demo_multilabel.yaml").manifest_entries([corpus])
    assert [e.label for e in multi] == [[int(r["nodule"]), int(r["effusion"])] for r in rows]


def test_missing_image_is_returned_for_the_report(corpus, tmp_path):
    rows = (corpus / "labels.csv").read_text().splitlines()
    rows.append("PAT-gone/series/IM0001.dcm,FAKEMRN999,0,1,0,1")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    entries = load_recipe(RECIPES / "demo.yaml").manifest_entries([tmp_path])
    assert [e.quarantine for e in entries].count("missing_file") == len(entries)  # no images here
    entries = load_recipe(RECIPES / "demo.yaml").manifest_entries([tmp_path], check_files=False)
    assert all(e.quarantine is None for e in entries) and entries[-1].label == 1
    assert not entries[-1].path.exists()


def test_parquet_manifest_gives_the_same_entries(corpus, tmp_path):
    table = pd.read_csv(corpus / "labels.csv")
    table.to_parquet(corpus / "labels.parquet")
    try:
        variant = _variant(tmp_path, "demo.yaml", manifest="labels.parquet", format=None)
        from_parquet = load_recipe(variant).manifest_entries([corpus])
    finally:
        (corpus / "labels.parquet").unlink()
    assert load_recipe(variant).format == "parquet"
    from_csv = load_recipe(RECIPES / "demo.yaml").manifest_entries([corpus])
    key = [(e.path, e.patient_id, e.label) for e in from_csv]
    assert [(e.path, e.patient_id, e.label) for e in from_parquet] == key


def test_non_integer_class_names_the_row(corpus, tmp_path):
    text = (corpus / "labels.csv").read_text().splitlines()
    for bad, match in (("2.5", "not a whole number"), ("abc", "not a number"),
                       ("4", "outside 0..3"), ("", "blank label")):
        parts = text[3].split(",")
        parts[text[0].split(",").index("finding")] = bad
        (tmp_path / "labels.csv").write_text("\n".join([*text[:3], ",".join(parts), *text[4:]]) + "\n")
        with pytest.raises(MedsslError, match=rf"labels.csv: row 2 \(line 4\), column 'finding'.*{match}"):
            load_recipe(RECIPES / "demo.yaml").manifest_entries([tmp_path])


# ---------------------------------------------------------------- CheXpert


def _chexpert(tmp_path: Path) -> Path:
    """A CheXpert-v1.0-small look-alike: train.csv, valid.csv, a few empty 'images'."""
    root = tmp_path / "chexpert"
    base = root / "CheXpert-v1.0-small"
    head = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_OBS]

    def row(path: str, values: dict) -> list:
        return [path, "Female", "68", "Frontal", "AP"] + [values.get(o, "") for o in CHEXPERT_OBS]

    train = [
        row("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", {"No Finding": "1.0"}),
        row("CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg",
            {"Cardiomegaly": "-1.0", "Edema": "1.0", "Fracture": "0.0"}),
        row("CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg",
            {"Pleural Effusion": "1.0", "Support Devices": "1.0"}),
        row("CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg", {"Edema": "1"}),
    ]
    valid = [row("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg",
                 {o: "0.0" for o in CHEXPERT_OBS} | {"Lung Opacity": "1.0"})]
    for name, rows in (("train.csv", train), ("valid.csv", valid)):
        base.mkdir(parents=True, exist_ok=True)
        with (base / name).open("w", newline="") as fh:
            csv.writer(fh).writerows([head, *rows])
        for r in rows[:3]:  # the last train image is missing on purpose
            (root / r[0]).parent.mkdir(parents=True, exist_ok=True)
            (root / r[0]).write_bytes(b"\xff\xd8")
    return root


def _vec(**on) -> list[int]:
    return [int(on.get(o, 0)) for o in CHEXPERT_OBS]


def test_chexpert_u_zeros_patients_from_path_and_official_split(tmp_path):
    root = _chexpert(tmp_path)
    recipe = load_recipe(RECIPES / "chexpert.yaml")
    entries = recipe.manifest_entries([root])
    assert [e.patient_id for e in entries] == ["00001", "00002", "00002", "00003", "64541"]
    assert [e.split for e in entries] == ["train"] * 4 + ["test"]
    assert entries[0].label == _vec(**{"No Finding": 1})
    assert entries[1].label == _vec(Edema=1)  # -1 Cardiomegaly -> 0 under U-Zeros
    assert entries[2].label == _vec(**{"Pleural Effusion": 1, "Support Devices": 1})
    assert entries[4].label == _vec(**{"Lung Opacity": 1})
    assert [e.quarantine for e in entries] == [None, None, None, "missing_file", None]
    assert entries[0].path == root / "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    assert entries[0].row == 0 and entries[4].row == 0  # rows count per manifest file


def test_chexpert_u_ones_and_ignore(tmp_path):
    root = _chexpert(tmp_path)
    ones = load_recipe(_variant(tmp_path, "chexpert.yaml", labels={"uncertain": "one"}))
    assert ones.manifest_entries([root])[1].label == _vec(Cardiomegaly=1, Edema=1)
    ignore = load_recipe(_variant(tmp_path, "chexpert.yaml", labels={"uncertain": "ignore"}))
    kept = ignore.manifest_entries([root])
    assert len(kept) == 4 and all(e.row != 1 or e.split == "test" for e in kept)
    assert [(e.row, e.quarantine, e.label) for e in ignore.dropped] == [(1, "uncertain_label", None)]
    everything = ignore.manifest_entries([root], include_dropped=True)
    assert len(everything) == 5 and everything[1].quarantine == "uncertain_label"
    strict = load_recipe(_variant(tmp_path, "chexpert.yaml", labels={"blank": "error"}))
    with pytest.raises(MedsslError, match="row 0 .*column 'Enlarged Cardiomediastinum'.*blank"):
        strict.manifest_entries([root])


# ---------------------------------------------------------------- NIH ChestX-ray14


def _nih(tmp_path: Path, extra_label: str | None = None) -> Path:
    root = tmp_path / "nih"
    (root / "images").mkdir(parents=True)
    head = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
            "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
            "OriginalImagePixelSpacing[x", "y]"]
    rows = [
        ["00000001_000.png", "Cardiomegaly", 0, 1, 58, "M", "PA", 2682, 2749, 0.143, 0.143],
        ["00000001_001.png", "Cardiomegaly|Emphysema", 1, 1, 58, "M", "PA", 2894, 2729, 0.143, 0.143],
        ["00000002_000.png", "No Finding", 0, 2, 81, "M", "PA", 2500, 2048, 0.171, 0.171],
        ["00000003_000.png", extra_label or "Hernia|Effusion|Pleural_Thickening", 0, 3, 74, "F",
         "PA", 2500, 2048, 0.168, 0.168],
        ["00000004_000.png", "Mass|Nodule", 0, 4, 82, "M", "AP", 2582, 2991, 0.143, 0.143],
    ]
    with (root / "Data_Entry_2017.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([head, *rows])
    for r in rows:
        (root / "images" / r[0]).write_bytes(b"\x89PNG")
    (root / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n00000002_000.png\n")
    (root / "test_list.txt").write_text("00000003_000.png\n")
    return root


def test_nih_pipe_labels_patient_column_and_split_lists(tmp_path):
    root = _nih(tmp_path)
    entries = load_recipe(RECIPES / "nih_chestxray14.yaml").manifest_entries([root])

    def vec(*names):
        return [int(n in names) for n in NIH]

    assert [e.label for e in entries] == [
        vec("Cardiomegaly"), vec("Cardiomegaly", "Emphysema"), vec(),
        vec("Hernia", "Effusion", "Pleural_Thickening"), vec("Mass", "Nodule"),
    ]
    assert [e.patient_id for e in entries] == ["1", "1", "2", "3", "4"]
    assert [e.split for e in entries] == ["train", "train", "train", "test", None]
    assert all(e.quarantine is None and e.path.parent == root / "images" for e in entries)


def test_nih_unknown_finding_names_the_row(tmp_path):
    root = _nih(tmp_path, extra_label="Effusion|Covid")
    with pytest.raises(MedsslError, match=r"row 3 \(line 5\), column 'Finding Labels'.*'Covid'"):
        load_recipe(RECIPES / "nih_chestxray14.yaml").manifest_entries([root])


def test_nih_image_in_two_split_lists_is_an_error(tmp_path):
    root = _nih(tmp_path)
    (root / "test_list.txt").write_text("00000003_000.png\n00000001_000.png\n")
    with pytest.raises(MedsslError, match="test_list.txt: line 2 names an image that is also in the train"):
        load_recipe(RECIPES / "nih_chestxray14.yaml").manifest_entries([root])


# ---------------------------------------------------------------- other keys


def test_split_column_slice_column_and_binary(tmp_path):
    (tmp_path / "vols").mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        (tmp_path / "vols" / name).write_bytes(b"")
    pd.DataFrame({
        "file": ["vols/a.nii.gz", "vols/a.nii.gz", "vols/b.nii.gz"],
        "pid": [17, 17, 23],
        "z": [0, 5, 2],
        "set": ["train", "validate", ""],
        "tumour": [0.0, 1.0, -1.0],
    }).to_parquet(tmp_path / "m.parquet")
    recipe = load_recipe(_write_recipe(tmp_path, {
        "name": "vols", "manifest": "m.parquet", "image_column": "file", "patient_column": "pid",
        "slice_column": "z", "split_column": "set",
        "split_values": {"train": "train", "val": "validate", "test": "test"},
        "labels": {"type": "binary", "columns": ["tumour"], "uncertain": "one"},
    }))
    entries = recipe.manifest_entries([tmp_path])
    assert [(e.patient_id, e.slice, e.split, e.label) for e in entries] == [
        ("17", 0, "train", 0), ("17", 5, "val", 1), ("23", 2, None, 1)]
    assert recipe.labels_info() == {"type": "binary", "names": ["negative", "positive"]}


def test_a_repeated_image_is_an_error(corpus, tmp_path):
    rows = (corpus / "labels.csv").read_text().splitlines()
    (tmp_path / "labels.csv").write_text("\n".join([*rows, rows[2]]) + "\n")
    with pytest.raises(MedsslError, match="row 9 repeats the image of row 1 in labels.csv"):
        load_recipe(RECIPES / "demo.yaml").manifest_entries([tmp_path], check_files=False)


def test_csv_saved_by_excel_with_a_byte_order_mark(tmp_path):
    (tmp_path / "m.csv").write_text("\ufeffimg,pid,y\nx.png,7,1\n", encoding="utf-8")
    recipe = load_recipe(_write_recipe(tmp_path, {
        "name": "bom", "manifest": "m.csv", "image_column": "img", "patient_column": "pid",
        "labels": {"type": "multiclass", "columns": ["y"], "names": ["a", "b"]}}))
    [entry] = recipe.manifest_entries([tmp_path])
    assert (entry.path.name, entry.patient_id, entry.label, entry.quarantine) == ("x.png", "7", 1, "missing_file")


def test_unmapped_split_value_is_an_error(tmp_path):
    (tmp_path / "m.csv").write_text("img,pid,fold,y\nx.png,1,holdout,0\n")
    recipe = load_recipe(_write_recipe(tmp_path, {
        "name": "s", "manifest": "m.csv", "image_column": "img", "patient_column": "pid",
        "split_column": "fold", "labels": {"type": "multiclass", "columns": ["y"], "names": ["a", "b"]}}))
    with pytest.raises(MedsslError, match="'holdout' is not mapped; add it to split_values"):
        recipe.manifest_entries([tmp_path])


def test_unlabeled_recipe_has_no_manifest_entries(tmp_path):
    recipe = load_recipe(RECIPES / "dicom_series_folder.yaml")
    assert recipe.manifest is None and recipe.labels_info() is None
    with pytest.raises(MedsslError, match="no manifest"):
        recipe.manifest_entries([tmp_path])


@pytest.mark.parametrize("change, match", [
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"labels": {"type": "multiclass", "columns": ["a"]}}, "labels.names: list the class names"),
    ({"labels": {"type": "multiclass", "columns": ["a", "b"]}}, "exactly one column"),
    ({"labels": {"type": "ordinal", "columns": ["a"]}}, "labels.type must be one of"),
    ({"labels": {"type": "multilabel", "columns": ["a", "b"], "names": ["x"]}}, "1 names for 2"),
    ({"labels": {"type": "multiclass", "source_column": "f", "separator": "|", "names": ["a", "b"]}},
     "source_column needs labels.type: multilabel"),
    ({"labels": {"type": "multilabel", "columns": ["a"], "uncertain": "maybe"}},
     "labels.uncertain must be one of"),
    ({"image_column": None}, "image_column: name the manifest column"),
    ({"patient_column": None}, "give exactly one"),
    ({"patient_pattern": "patient\\d+"}, "give exactly one"),
    ({"patient_column": None, "patient_pattern": "patient\\d+"}, "exactly one \\(capturing group\\)"),
    ({"patient_column": None, "patient_pattern": "patient(\\d+"}, "not a valid regex"),
    ({"split_values": {"train": "t"}}, "split_values: needs split_column"),
    ({"split_column": "s", "split_values": {"dev": "d"}}, "keys must be train, val, test"),
    ({"manifest": "labels.xlsx"}, "cannot tell csv or parquet"),
    ({"manifest": {"training": "a.csv"}}, "keys are splits"),
    ({"name": "my recipe"}, "name: use letters"),
    ({"manifest": None}, "need a manifest"),
])
def test_bad_recipes_name_the_file_and_key(tmp_path, change, match):
    tree = {"name": "bad", "manifest": "labels.csv", "image_column": "path",
            "patient_column": "patient_id",
            "labels": {"type": "multiclass", "columns": ["finding"], "names": ["a", "b"]}}
    tree.update(change)
    path = _write_recipe(tmp_path, tree, "bad.yaml")
    with pytest.raises(ConfigError, match=match) as info:
        load_recipe(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_errors_do_not_quote_image_paths(tmp_path, corpus):
    variant = _variant(tmp_path, "demo.yaml", patient_column=None, patient_pattern="MRN(\\d+)")
    with pytest.raises(MedsslError, match="row 0 .*does not match the path") as info:
        load_recipe(variant).manifest_entries([corpus])
    assert "PAT-" not in str(info.value)  # the folder holds the (fake) patient name


def test_manifest_problems_name_the_file_and_column(tmp_path, corpus):
    missing = _variant(tmp_path, "demo.yaml", manifest="nope.csv")
    with pytest.raises(MedsslError, match="manifest .*nope.csv not found"):
        load_recipe(missing).manifest_entries([corpus])
    wrong = _variant(tmp_path, "demo.yaml", labels={"columns": ["diagnosis"]})
    with pytest.raises(MedsslError, match="no column 'diagnosis' .*key labels.columns"):
        load_recipe(wrong).manifest_entries([corpus])
    with pytest.raises(ConfigError, match="config file not found"):
        load_recipe(tmp_path / "absent.yaml")
