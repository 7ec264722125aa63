"""Patient-level split assignment: parsing, determinism, fractions, official splits."""

from __future__ import annotations

import hashlib

import pytest

from medssl.data.splits import assign_split, parse_splits, unit_interval
from medssl.errors import MedsslError


def test_parse_default_spec_keeps_order():
    assert parse_splits("train=0.8,val=0.1,test=0.1") == {"train": 0.8, "val": 0.1, "test": 0.1}
    assert list(parse_splits(" b=0.5 , a=0.5 ")) == ["b", "a"]


@pytest.mark.parametrize("spec, words", [
    ("train=0.8,val=0.1", "sum to 1"),
    ("train=0.9,val=0.2,test=-0.1", "> 0"),
    ("Train=1", "lower-case"),
    ("train=0.5,train=0.5", "twice"),
    ("train", "NAME=FRACTION"),
    ("train=abc", "not a number"),
    ("train=nan,val=1", "> 0"),
    ("", "no splits"),
])
def test_parse_rejects_bad_specs_with_a_clear_message(spec, words):
    with pytest.raises(MedsslError, match=words):
        parse_splits(spec)


def test_sum_within_tolerance_is_accepted():
    parse_splits("a=0.3333333,b=0.3333333,c=0.3333334")


def test_unit_interval_matches_sha256_reference():
    digest = hashlib.sha256(b"p-0123456789abcdef").digest()
    expected = (int.from_bytes(digest[:8], "big") >> 11) / 2**53
    assert unit_interval("p-0123456789abcdef") == expected
    assert 0.0 <= expected < 1.0


def test_assignment_is_deterministic_and_respects_fractions():
    fractions = parse_splits("train=0.7,val=0.2,test=0.1")
    patients = [f"p-{i:016x}" for i in range(5000)]
    first = [assign_split(p, fractions) for p in patients]
    assert first == [assign_split(p, dict(fractions)) for p in patients]
    counts = {name: first.count(name) / len(first) for name in fractions}
    for name, fraction in fractions.items():
        # binomial sd at n=5000 is < 0.007; 0.03 leaves no room for a biased cut
        assert abs(counts[name] - fraction) < 0.03, counts


def test_cut_points_follow_the_given_order():
    fractions = {"a": 0.5, "b": 0.5}
    for p in (f"p-{i}" for i in range(200)):
        assert assign_split(p, fractions) == ("a" if unit_interval(p) < 0.5 else "b")


def test_official_split_wins_and_is_validated():
    fractions = parse_splits("train=0.8,val=0.1,test=0.1")
    assert assign_split("p-1", fractions, official="TEST") == "test"
    assert assign_split("p-1", fractions, official="") == assign_split("p-1", fractions)
    with pytest.raises(MedsslError, match="not a valid split name"):
        assign_split("p-1", fractions, official="hold out")
