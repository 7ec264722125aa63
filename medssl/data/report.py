"""``medssl shard``'s per-input report and its verdict: the result line and the exit code.

The report (``--report``, by default ``<out>.report.jsonl`` beside the shard folder, never in
it: source paths can carry patient names) holds one JSON line per input, in input order::

    {"path": "...", "outcome": "written", "samples": 212}
    {"path": "...", "outcome": "written", "samples": 211,
     "skipped": {"non_finite_slice": [57]}}
    {"path": "...", "outcome": "quarantined", "reason": "too_large",
     "detail": "a 60000x60000x1 frame of 16-bit values is 3,600,000,000 pixel values, ..."}

``skipped`` (only when some slices were left out of a written file) maps a reason to the
positions of those slices in the order the file is read. ``attributes_absent`` (only when the
run records attributes and some of this file's samples have none for a name) maps the
attribute to that number of samples: a blank, non-numeric or implausible source value. ``detail`` is the exception class
of an unexpected error (``read_error``), or for ``too_large`` what the header claimed: our
own words and numbers, never text from the file.

Verdict. A run fails (exit 1, one ERROR line) when it wrote no sample at all, or when more
than ``--max-bad`` (default ``DEFAULT_MAX_BAD``) of its inputs were lost. Rows a recipe's
label policy drops on purpose (``uncertain_label``: the user asked for it) are not losses and
are left out of both sides of that fraction; everything else quarantined is (a missing file,
a burned-in annotation, a file too large for ``--max-pixels`` ...).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from medssl.errors import ConfigError

log = logging.getLogger(__name__)

#: Fraction of inputs a run may lose before it fails: most of the data missing is an error.
DEFAULT_MAX_BAD = 0.5
#: Quarantine reasons that are a recipe's deliberate choice, not data lost.
POLICY_DROPS = ("uncertain_label",)


def report_path(args: argparse.Namespace) -> Path:
    """``--report`` or ``<out>.report.jsonl`` beside the shard folder; never inside it."""
    out = Path(args.out).resolve()
    default = out.parent / f"{out.name}.report.jsonl"
    path = Path(args.report) if getattr(args, "report", None) else default
    if out == path.resolve() or out in path.resolve().parents:
        raise ConfigError(f"--report {path} is inside the shard folder; the report names source "
                          "files (which can carry patient names), so put it beside the folder")
    if path != default and not path.parent.is_dir():
        raise ConfigError(f"--report {path}: folder {path.parent} does not exist")
    return path


def report_line(path: str, entry: dict, detail: str | None = None,
                slices: int | None = None) -> str:
    """One report line for a journal entry (``journal.Journal.add_input``); ``slices``: the
    number of files of a DICOM series read as one volume (``--volumes``)."""
    line: dict = {"path": path, "outcome": entry["outcome"]}
    if slices is not None:
        line["slices"] = slices
    if entry["outcome"] == "written":
        line["samples"] = sum(entry["samples"].values())
        if entry.get("skipped"):
            line["skipped"] = entry["skipped"]
        absent: dict = {}
        for by_name in (entry.get("attributes") or {}).values():
            for name, block in by_name.items():
                if block["absent"]:
                    absent[name] = absent.get(name, 0) + block["absent"]
        if absent:  # samples written without that attribute (blank or unusable source value)
            line["attributes_absent"] = dict(sorted(absent.items()))
    else:
        line["reason"] = entry["reason"]
        if detail:
            line["detail"] = detail
    # ensure_ascii: a file name that is not valid UTF-8 (lone surrogates) stays valid JSON.
    return json.dumps(line, ensure_ascii=True) + "\n"


def lost_fraction(inputs: dict) -> tuple[int, int]:
    """(inputs lost, inputs that could have been written) from index.json's ``inputs``."""
    by_reason = inputs.get("quarantined_by_reason") or {}
    dropped = sum(by_reason.get(r, 0) for r in POLICY_DROPS)
    return inputs["quarantined"] - dropped, inputs["seen"] - dropped


def finish(index: dict, report: Path, max_bad: float, already: bool = False) -> int:
    """Print the run's one result line (stdout); return 0, or 1 with one ERROR line."""
    inputs = index["inputs"]
    splits = " / ".join(f"{s} {v['samples']}" for s, v in index["splits"].items())
    reasons = ", ".join(f"{r} {n}" for r, n in inputs["quarantined_by_reason"].items()) or "none"
    skipped = sum((inputs.get("skipped_slices_by_reason") or {}).values())
    total = sum(v["samples"] for v in index["splits"].values())
    prefix = "already complete: " if already else ""
    also = f"; {skipped} slices skipped" if skipped else ""
    # The one line a user (or script) reads after a long run; stdout on purpose.
    print(f"{prefix}wrote {total} samples from {inputs['written']} files into "
          f"{len(index['shards'])} shards ({splits}); {inputs['quarantined']} files quarantined "
          f"({reasons}){also} — report: {report}")
    if total == 0:
        log.error("no samples written: %d of %d inputs quarantined (%s); see %s",
                  inputs["quarantined"], inputs["seen"], reasons, report)
        return 1
    lost, eligible = lost_fraction(inputs)
    if lost > max_bad * eligible:
        log.error("%d of %d inputs lost (%.1f%%), more than --max-bad %g; see %s",
                  lost, eligible, 100 * lost / max(eligible, 1), max_bad, report)
        return 1
    return 0
