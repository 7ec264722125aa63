"""Subgroup attributes: age bands at their edges, coarsening rules, recipe `attributes:` errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medssl.data.attributes import (
    AgeBands,
    attribute_problems,
    dicom_age_years,
    header_attributes,
    parse_header_names,
    parse_years,
    sex_code,
    short_text,
    view_code,
    years_between,
)
from medssl.data.deid import Pseudonymizer
from medssl.data.recipes import load_recipe
from medssl.errors import ConfigError

SALT = b"0123456789abcdef0123456789abcdef"
RECIPES = Path(__file__).resolve().parents[2] / "datasets" / "recipes"


def test_age_bands_at_their_edges_and_90_plus_in_the_top_band():
    bands = AgeBands((0, 18, 40, 60, 80))
    assert bands.labels == ["0-17", "18-39", "40-59", "60-79", "80+"]
    assert bands.band(0) == "0-17" and bands.band(17) == "0-17" and bands.band(17.9) == "0-17"
    assert bands.band(18) == "18-39" and bands.band(39) == "18-39" and bands.band(40) == "40-59"
    assert bands.band(79) == "60-79" and bands.band(80) == "80+"
    assert bands.band(95) == "80+" and bands.band(90) == "80+"          # Safe Harbor: 90+ merged
    assert bands.band(-1) is None and bands.band(121) is None and bands.band(None) is None
    top90 = AgeBands.parse([0, 45, 90], "k")
    assert top90.band(89) == "45-89" and top90.band(104) == "90+"


@pytest.mark.parametrize("bins, match", [
    ([0, 18, 40, 95], "above 90"),          # a band of 95+ would single out the oldest
    ([5, 18, 40], "first edge must be 0"),
    ([0, 18, 20], "less than 5 years"),     # a two-year band is nearly an exact age
    ([0, 40, 18], "less than 5 years"),     # not increasing
    ([0], "at least 2"),
    ([0, 18.5, 40], "whole-year"),
])
def test_bad_age_bins_are_refused(bins, match):
    with pytest.raises(ConfigError, match=match):
        AgeBands.parse(bins, "attributes.age.bins")


def test_ages_from_cells_and_dicom_strings_and_dates():
    assert parse_years("58") == 58 and parse_years(58.0) == 58 and parse_years("045Y") == 45
    assert parse_years("unknown") is None and parse_years("") is None and parse_years(None) is None
    assert dicom_age_years("006M") == 0.5 and dicom_age_years("45") is None
    assert years_between("19500316", "20000315") == 49.0    # a day short of 50
    assert years_between("19500315", "20000315") == 50.0
    assert years_between("2000-03-15", "20000315") is None  # not a DICOM date
    assert years_between("20010101", "20000101") is None    # born after the study


def test_categorical_coarsening():
    assert [sex_code(v) for v in ("M", "female", " Male ", "O", "Unknown", "X")] == \
        ["M", "F", "M", "O", None, None]
    assert view_code("Frontal") == "FRONTAL" and view_code("PA") == "PA"
    assert view_code("view of the chest, left side") is None
    assert short_text("GE MEDICAL SYSTEMS") == "GE MEDICAL SYSTEMS"
    assert short_text("Dr. O'Brien <scanner>\n" + "x" * 40) == "Dr. OBrien scanner " + "x" * 13
    assert len(short_text("A" * 80)) == 32 and short_text("¿?") is None


def test_header_attributes_only_those_asked_and_site_is_a_pseudonym():
    pseudo = Pseudonymizer(SALT)
    header = {"PatientSex": "F", "PatientAge": None, "PatientBirthDate": "19010101",
              "StudyDate": "19560202", "InstitutionName": "St Canary Hospital",
              "StationName": "CT01", "Manufacturer": "Siemens", "ManufacturerModelName": "Force"}
    assert header_attributes(header, ("sex",), pseudo) == {"sex": "F"}
    got = header_attributes(header, parse_header_names("sex,age,site,scanner"), pseudo)
    assert got == {"sex": "F", "age": "40-59", "site": pseudo.site("St Canary Hospital", "CT01"),
                   "manufacturer": "Siemens", "model": "Force"}
    assert got["site"].startswith("site-") and len(got["site"]) == 13
    assert pseudo.site("St Canary Hospital", "CT01") != pseudo.site("St Canary Hospital", "CT02")
    assert Pseudonymizer(bytes(32)).site("St Canary Hospital", "CT01") != got["site"]
    assert header_attributes({"PatientSex": "Female", "PatientAge": "094Y"},
                             ("sex", "age"), pseudo) == {"age": "80+"}   # only M/F/O pass


def test_unknown_header_attribute_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"--attributes: unknown attribute 'birthdate'; valid: "
                                          r"sex, age, site, scanner"):
        parse_header_names("sex,birthdate")
    assert parse_header_names("scanner, sex") == ("sex", "manufacturer", "model")


def test_attribute_problems_flag_unknown_keys_raw_ages_and_free_text():
    assert attribute_problems({"sex": "F", "age": "80+", "site": "site-0a1b2c3d"}) == []
    assert attribute_problems({"birth_date": "19010101"})[0].startswith("attribute 'birth_date'")
    assert attribute_problems({"age": "47"}) and attribute_problems({"age": "45-46"})
    assert attribute_problems({"site": "St. Mary's, ward 3"})
    assert attribute_problems(["sex"]) == ["attributes is not an object"]


def _recipe(tmp_path: Path, attributes) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "manifest": "m.csv", "image_column": "path",
                                    "patient_column": "pid", "attributes": attributes}))
    return path


@pytest.mark.parametrize("attributes, match", [
    ({"ethnicity": "Race"}, r"attributes\.ethnicity: unknown attribute; choose from sex, age"),
    ({"age": {"column": "Age", "bins": [0, 18, 40, 60, 80, 100]}}, r"attributes\.age\.bins: edge 100"),
    ({"sex": {"column": "Sex", "bins": [0, 18]}}, r"attributes\.sex: unknown key 'bins'"),
    ({"site": {"column": "Site", "pseudonym": "yes please"}}, r"attributes\.site\.pseudonym"),
    ({"view": {"pseudonym": True}}, r"attributes\.view: unknown key 'pseudonym'"),
    ({"age": {"bins": [0, 18]}}, r"attributes\.age\.column: name the manifest column"),
])
def test_recipe_attribute_errors_name_the_file_and_key(tmp_path, attributes, match):
    path = _recipe(tmp_path, attributes)
    with pytest.raises(ConfigError, match=match) as err:
        load_recipe(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_header_attributes_recipe_key_and_attributes_need_a_manifest(tmp_path):
    path = tmp_path / "h.yaml"
    path.write_text("name: h\nmanifest: null\nheader_attributes: [sex, shoe_size]\n")
    with pytest.raises(ConfigError, match=r"h\.yaml: header_attributes: unknown attribute 'shoe_size'"):
        load_recipe(path)
    path.write_text("name: h\nmanifest: null\nattributes: {sex: Sex}\n")
    with pytest.raises(ConfigError, match="attributes: map manifest columns, so they need a manifest"):
        load_recipe(path)


@pytest.mark.parametrize("name, expected", [
    ("chexpert.yaml", {"sex": "Sex", "age": "Age", "view": "Frontal/Lateral"}),
    ("nih_chestxray14.yaml", {"sex": "Patient Gender", "age": "Patient Age",
                              "view": "View Position"}),
    ("demo.yaml", {"sex": "sex", "age": "age", "site": "site"}),
    ("demo_multilabel.yaml", {"sex": "sex", "age": "age", "site": "site"}),
])
def test_shipped_recipes_map_attributes(name, expected):
    recipe = load_recipe(RECIPES / name)
    assert {n: s.column for n, s in recipe.attribute_specs.items()} == expected
    assert recipe.attribute_specs["age"].bins.labels[-1] == "80+"
    if "site" in expected:  # the synthetic sites are hospital names
        assert recipe.attribute_specs["site"].pseudonym
