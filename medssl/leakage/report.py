"""The leakage report: ``leakage.json`` (format ``medssl-leakage/1``) and ``leakage.md``.

Both hold counts, thresholds with their measured recall and false-positive rate, and pairs of
pseudonymous sample keys with distances: never a path (a folder name can carry a patient's
name). A report is rewritten in place only where the folder's ``leakage.json`` is one of ours.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from medssl.errors import MedsslError
from medssl.leakage.scan import LeakageResult, LeakPair

FORMAT = "medssl-leakage/1"
JSON_NAME = "leakage.json"
MD_NAME = "leakage.md"


def to_dict(result: LeakageResult) -> dict:
    """The JSON form of a result (the contract finetune records per task)."""
    out = asdict(result)
    out["format"] = FORMAT
    out["leaked"] = result.leaked
    return out


def from_dict(data: dict) -> LeakageResult:
    """Read back ``to_dict``'s output (a finetune run resumes with the recorded check)."""
    if data.get("format") != FORMAT:
        raise MedsslError(f"leakage record format is {data.get('format')!r}, expected {FORMAT!r}")
    fields = {k: v for k, v in data.items() if k not in ("format", "leaked")}
    fields["pairs"] = [LeakPair(**p) for p in fields.get("pairs", [])]
    return LeakageResult(**fields)


def _measured_words(measured: dict, radius: int, bits: int) -> str:
    if measured.get("recall") is None or (measured.get("radius"), measured.get("bits")) != (
            radius, bits):
        return "its recall and false-positive rate have not been measured for these settings"
    lo, hi = measured.get("recall_ci", (None, None))
    ci = f" (95% CI {lo:.2f}-{hi:.2f})" if lo is not None else ""
    return (f"on {measured['benchmark']} this threshold found {measured['recall']:.2f}{ci} of "
            f"{measured.get('copies', '?')} transformed copies, and flagged "
            f"{100 * measured['fp_rate_pairs']:.3f}% of unrelated cross-set pairs"
            + (f" (yet {100 * measured['clean_task_images_flagged']:.0f}% of task images with no "
               "copy had at least one such pair there, every synthetic patient being drawn from "
               "one template: judge pairs by looking, not by their count)"
               if measured.get("clean_task_images_flagged") is not None else ""))


def markdown(result: LeakageResult) -> str:
    """The human-readable report."""
    task_total = sum(result.task_samples.values())
    matched = sum(result.matched.values())
    rule = f"Hamming distance <= {result.radius} of {result.bits} bits"
    if result.min_cosine is not None:
        rule += f", or embedding cosine >= {result.min_cosine}"
    lines = [
        "# Leakage check: task images seen in pretraining",
        "",
        (f"- Pretraining images: {result.pretrain_samples}; task images: {task_total} "
        f"({', '.join(f'{s} {n}' for s, n in result.task_samples.items())})."),
        (f"- Rule: a pair is reported at {rule} between perceptual hashes computed in each "
        f"image's own window; {_measured_words(result.measured, result.radius, result.bits)}."),
        (f"- Blank images (flat in their window, never compared): pretraining "
        f"{result.blank['pretrain']}, task {result.blank['task']}."),
        "",
    ]
    if not result.leaked:
        lines.append("No task image has a near-duplicate in the pretraining set under this rule. "
                     "That is not proof of absence: copies transformed beyond what was "
                     "measured can pass unseen.")
    else:
        per_split = ", ".join(f"{s} {n} of {result.task_samples[s]}"
                              for s, n in result.matched.items())
        lines += [(f"**{matched} task image(s) have at least one near-duplicate in the pretraining "
                  f"set** ({per_split}); {result.pairs_total} pair(s) in all. Each needs a look: a "
                  f"pair can also be two different but very similar images."), "",
                  "| task split | task key | pretraining key | Hamming | cosine |",
                  "| --- | --- | --- | ---: | ---: |"]
        for p in result.pairs:
            cos = "" if p.cosine is None else f"{p.cosine:.3f}"
            lines.append(f"| {p.task_split} | {p.task_key} | {p.pretrain_key} | {p.hamming} | {cos} |")
        if len(result.pairs) < result.pairs_total:
            lines += ["", (f"{result.pairs_total - len(result.pairs)} further pair(s) are counted "
                      "but not listed (at most the closest few per task image).")]
    return "\n".join(lines) + "\n"


def write_report(result: LeakageResult, out_dir: Path | str) -> tuple[Path, Path]:
    """Write ``leakage.json`` and ``leakage.md`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / JSON_NAME, out / MD_NAME
    if js.exists():
        try:
            ours = json.loads(js.read_text(encoding="utf-8")).get("format") == FORMAT
        except (json.JSONDecodeError, AttributeError):
            ours = False
        if not ours:
            raise MedsslError(f"{js}: exists and is not a medssl leakage report; "
                              "choose another output folder")
    elif md.exists():
        raise MedsslError(f"{md}: exists without {JSON_NAME}; choose another output folder")
    for path, text in ((js, json.dumps(to_dict(result), indent=2) + "\n"), (md, markdown(result))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return js, md
