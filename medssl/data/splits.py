"""Patient-level train/val/test splits, decided by a hash of the patient pseudonym.

Splitting by slice or study leaks a patient's anatomy across splits and inflates results, so
the unit of assignment is the patient. The split is a pure function of the pseudonym and the
fractions: the same patient lands in the same split on every run, on every worker, and in
every later re-shard with the same salt, without a table to keep.
"""

from __future__ import annotations

import hashlib
import math
import re

from medssl.errors import MedsslError

_NAME = re.compile(r"^[a-z0-9_]+$")
_TOLERANCE = 1e-6


def parse_splits(spec: str) -> dict[str, float]:
    """Parse ``"train=0.8,val=0.1,test=0.1"`` into ``{"train": 0.8, ...}`` (insertion order kept).

    Names must match ``[a-z0-9_]+`` and be unique; fractions must be > 0 and sum to 1.
    """
    fractions: dict[str, float] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep:
            raise MedsslError(f"--splits: '{part}' is not NAME=FRACTION "
                              "(e.g. train=0.8,val=0.1,test=0.1)")
        if not _NAME.match(name):
            raise MedsslError(f"--splits: split name '{name}' must be lower-case letters, "
                              "digits or _")
        if name in fractions:
            raise MedsslError(f"--splits: split '{name}' is given twice")
        try:
            fraction = float(value)
        except ValueError:
            raise MedsslError(f"--splits: fraction '{value}' of split '{name}' "
                              "is not a number") from None
        if math.isnan(fraction) or fraction <= 0:
            raise MedsslError(f"--splits: fraction of split '{name}' must be > 0, got {value}")
        fractions[name] = fraction
    if not fractions:
        raise MedsslError("--splits: no splits given (e.g. train=0.8,val=0.1,test=0.1)")
    total = sum(fractions.values())
    if abs(total - 1.0) > _TOLERANCE:
        raise MedsslError(f"--splits: fractions must sum to 1, they sum to {total:g} in '{spec}'")
    return fractions


def unit_interval(text: str) -> float:
    """Deterministic ``[0, 1)`` value from sha256 of ``text`` (first 8 bytes, 53 bits used)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / float(1 << 53)


def assign_split(patient_pseudonym: str, fractions: dict[str, float],
                 official: str | None = None) -> str:
    """The split of a patient: ``official`` (a recipe's split column) when given, else by hash.

    The hash maps the pseudonym uniformly onto ``[0, 1)``, which is cut at the cumulative
    fractions in the order given. The pseudonym is already a salted HMAC, so the assignment
    reveals nothing about the raw patient id.
    """
    if official is not None and str(official).strip():
        name = str(official).strip().lower()
        if not _NAME.match(name):
            raise MedsslError(f"recipe split value '{official}' is not a valid split name "
                              "([a-z0-9_]+)")
        return name
    u = unit_interval(patient_pseudonym)
    cumulative = 0.0
    names = list(fractions)
    for name in names:
        cumulative += fractions[name]
        if u < cumulative:
            return name
    return names[-1]  # sums within 1e-6 of 1 can leave a sliver at the top
