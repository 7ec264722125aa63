"""The model card (README.md) of a published dir, built with huggingface_hub's ModelCard.

Everything on the card comes from the run's resolved config, the shard folder's index.json
(counts only) and, optionally, a finetune results.json. It must carry nothing identifying:
no path (source paths and even shard paths can name patients or sites), no date beyond the
year the index already reduces to, no free text from a source file. Strings that reach the
card from data (modality codes, quarantine reasons) are filtered to short code-like tokens.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from medssl.card_volume import VolumeCard
from medssl.results import Results
from medssl.rundir import ShardSource

__all__ = ["CardInfo", "VolumeCard", "build_card"]

_CODE = re.compile(r"^[A-Za-z0-9_.+-]{1,32}$")
_FORMAT = re.compile(r"^medssl-shards/\d+$")


@dataclass
class CardInfo:
    """What the card says. ``index`` is the shard folder's parsed index.json (or None)."""

    arch: str
    in_chans: int
    image_size: int
    method: str
    steps: int
    train: dict[str, Any]                # batch_size, lr, max_steps ... (numbers only shown)
    mean: list[float]
    std: list[float]
    modality: str | None
    window: dict[str, float] | None
    license: str = "other"
    git_sha: str = "unknown"
    medssl_version: str = "unknown"
    index: dict[str, Any] | None = None
    index_sha256: str | None = None
    sources: list[ShardSource] = field(default_factory=list)   # what pretraining read (run.json)
    results: Results | None = None
    repo_id: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    #: index sha256 -> patients hashed into pretraining_patients.json (medssl/leakage/patients.py)
    hashed_patients: dict[str, int] = field(default_factory=dict)
    started_from: str | None = None      # the backbone's weights at step 0 (run.json)
    checkpoint: dict[str, Any] | None = None   # {"step", "chosen_by", "rankme"} (medssl publish)
    volume: VolumeCard | None = None     # 3-D weights (monai:<Net>): network, input cube, spacing


def build_card(info: CardInfo) -> ModelCard:
    """The ModelCard for ``info``: YAML metadata (licence, library, tags) plus markdown."""
    library = "monai" if info.volume else "timm"
    tags = ["medical-imaging", "self-supervised", info.method, library, "medssl"]
    if info.volume:
        tags.append("3d")
    if info.modality:
        tags.append(_code(info.modality).lower())
    data = ModelCardData(
        license=info.license,
        library_name=library,
        pipeline_tag="image-feature-extraction",
        tags=tags,
    )
    sections = [
        f"# {info.arch} · {info.method.upper()} · medssl\n",
        ("**Not for clinical use.** These weights are a research artifact for building and "
         "benchmarking models; they have not been validated for diagnosis, triage or any "
         "decision about a patient.\n"),
        _description(info),
        _provenance(info),
        _deid(),
        _training(info),
        _results(info.results),
        _intended_use(info.volume is not None),
        _limitations(info),
        _how_to_load(info),
    ]
    body = "\n".join(s for s in sections if s)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _description(info: CardInfo) -> str:
    window = (f"window center {_num(info.window.get('center'))}, width {_num(info.window.get('width'))} "
              "(modality units)" if info.window else "no window recorded")
    if info.volume:
        from medssl.card_volume import description

        return description(info.arch, info.method, info.modality, info.in_chans, window,
                           info.mean, info.std, info.volume)
    return (
        "## Model description\n\n"
        f"A `{info.arch}` backbone (timm, `num_classes=0`: pooled features only) pretrained with "
        f"{info.method} on unlabeled {info.modality or 'medical'} images with medssl. It takes "
        f"{info.in_chans}-channel {info.image_size}×{info.image_size} inputs: "
        f"{window}, scaled to [0, 1], then normalised with mean {info.mean} and std {info.std} "
        "(also in `config.json` → `pretrained_cfg`).\n"
    )


def _read_by_pretraining(info: CardInfo) -> str:
    """What the run record says pretraining read: split, index digest, salt id, counts, so that
    anyone benchmarking these weights later can check their test data against it."""
    if not info.sources:
        return ""
    lines = [("Pretraining read (from the run record; digests identify the shard folders without "
              "naming them):\n"),
             "| split | index.json sha256 | salt id | shards | samples | patients hashed |",
             "|---|---|---|---:|---:|---:|"]
    for s in info.sources:
        hashed = info.hashed_patients.get(s.index_sha256 or "")
        lines.append(f"| {_code(s.split or '?')} | `{_digest(s.index_sha256)}` | "
                     f"`{_code(s.salt_id or '?')}` | {_num(s.shards)} | {_num(s.samples)} | "
                     f"{_num(hashed)} |")
    lines.append("")
    lines.append(
        "Leakage checks for whoever benchmarks these weights: `medssl finetune` refuses a task "
        "built from a shard folder with one of these digests when pretraining read its test or "
        "val split; for shards of the same salt id it counts the task's test and val patients "
        "seen in pretraining"
        + (" against `pretraining_patients.json`: keyed hashes (HMAC-SHA256 under the nonce in "
           "that file) of the pretraining patients' pseudonyms, which reveal nothing to anyone "
           "who does not already hold shards of that salt." if info.hashed_patients else
           "; these weights carry no patient hashes (the shard folders were not readable at "
           "publish time), so that count needs the pretraining shards "
           "(`evaluation.pretraining_shards`)."))
    return "\n".join(lines) + "\n"


def _provenance(info: CardInfo) -> str:
    index = info.index
    read = _read_by_pretraining(info)
    if not index:
        return ("## Data provenance\n\nThe shard index of the training data was not available at "
                "publish time, so its split and input counts are **not recorded** here.\n\n" + read)
    source = (f"Counts from the training shards' `index.json` (shard format "
              f"`{_format(index.get('format'))}`; written by medssl "
              f"{_code(index.get('medssl_version', '?'))}; index sha256 `{info.index_sha256 or '?'}`).\n")
    lines = ["## Data provenance\n", source,
             "| split | samples | patients |", "|---|---:|---:|"]
    total_patients = 0
    for split, counts in sorted((index.get("splits") or {}).items()):
        counts = counts if isinstance(counts, dict) else {}
        patients = counts.get("patients")
        total_patients += int(patients) if isinstance(patients, int) else 0
        lines.append(f"| {_code(split)} | {_num(counts.get('samples'))} | {_num(patients)} |")
    lines.append("")
    lines.append(f"- Patients in all splits: {total_patients} (splits are disjoint by patient).")
    modalities = index.get("modalities") or {}
    if modalities:
        mods = ", ".join(f"{_code(m)} {_num(n)}" for m, n in sorted(modalities.items()))
        lines.append(f"- Modalities (samples): {mods}.")
    inputs = index.get("inputs") or {}
    if inputs:
        reasons = inputs.get("quarantined_by_reason") or {}
        why = ", ".join(f"{_code(r)} {_num(n)}" for r, n in sorted(reasons.items()))
        lines.append(f"- Input files: {_num(inputs.get('seen'))} seen, {_num(inputs.get('written'))} "
                     f"written, {_num(inputs.get('quarantined'))} quarantined" + (f" ({why})." if why else "."))
    config = index.get("config") or {}
    salt = config.get("salt_id")
    if salt:
        lines.append(f"- Pseudonym salt id: `{_code(str(salt))}` (a hash of the secret salt, not the salt).")
    if index.get("created"):
        lines.append(f"- Shards created: {_code(str(index['created']))[:4]}.")
    return "\n".join(lines) + "\n\n" + read


def _deid() -> str:
    return (
        "## De-identification\n\n"
        "- Metadata: an allow-list. Only modality, body part, view, pixel spacing (voxel spacing "
        "for volumes), slice index, "
        "intensity encoding and default window are kept from each source file (DICOM PS3.15 "
        "Annex E intent: no names, dates, UIDs, institutions, free text or private tags).\n"
        "- Identifiers: patient, study and series ids are replaced by salted HMAC pseudonyms; "
        "the salt never leaves the site that made the shards. Sample keys carry no path or UID.\n"
        "- Pixels: images flagged `BurnedInAnnotation` and secondary captures are quarantined, "
        "not written. PNG/NIfTI text fields are dropped.\n"
        "- **Not covered:** text burned into pixels of images not flagged as such (e.g. some "
        "ultrasound or scanned film), and faces: head CT/MR can be rendered into a recognisable "
        "face and need defacing before pretraining, which medssl does not do.\n"
    )


def _training(info: CardInfo) -> str:
    size_rows: list[tuple[str, Any]] = [("input size (px)", info.image_size)]
    if info.volume:
        from medssl.card_volume import training_rows

        size_rows = training_rows(info.volume)
    rows = [("method", info.method), ("architecture", info.arch), ("input channels", info.in_chans),
            *size_rows, ("optimizer steps", info.steps),
            ("started from", info.started_from or "not recorded (a run from before medssl recorded it)")]
    for key in ("max_steps", "batch_size", "lr", "peak_lr", "optimizer", "weight_decay",
                "warmup_steps", "precision"):
        if key in info.train and isinstance(info.train[key], (int, float, str)):
            rows.append((f"train.{key}", info.train[key]))
    if info.checkpoint is not None:
        rows.append(("checkpoint", _checkpoint_words(info.checkpoint)))
    rows.append(("medssl git sha", info.git_sha))
    table = "\n".join(f"| {k} | {_cell(v)} |" for k, v in rows)
    return f"## Training\n\n| setting | value |\n|---|---|\n{table}\n"


def _checkpoint_words(chosen: dict[str, Any]) -> str:
    """``step 800: the highest RankMe on the val batch (RankMe 41.20)``; a run without the
    label-free monitor (train.eval_every=0) gets no score."""
    rankme = chosen.get("rankme")
    score = f" (RankMe {rankme:.2f})" if isinstance(rankme, (int, float)) else ""
    how = {"latest": "the newest", "best-rankme": "the highest RankMe on the val batch",
           "step": "chosen by step"}.get(chosen.get("chosen_by"), str(chosen.get("chosen_by")))
    return f"step {chosen.get('step')}: {how}{score}"


def _results(results: Results | None) -> str:
    if results is None:
        return ""
    if not results.aggregates:
        return "## Benchmark results\n\nThe results file held no aggregates.\n"
    lines = ["## Benchmark results\n",
             "Downstream results from `medssl finetune` (mean over effective seeds; 95% bootstrap "
             "CI in brackets, resampling the unit shown: test patients, or images where a task "
             "has no patient ids).\n",
             "| task | init | protocol | label fraction | AUC | ACC | effective seeds | resampled |",
             "|---|---|---|---:|---|---|---:|---|"]
    leaks = _leakage_notes(results)
    for agg in results.aggregates:
        mark = " †" if (agg.task, agg.init) in leaks else ""
        lines.append(
            f"| {_cell(agg.task)}{mark} | {_cell(agg.init_label)} | {_cell(agg.protocol)} | "
            f"{_num(agg.fraction)} | {_metric(agg.auc_mean, agg.auc_ci)} | "
            f"{_metric(agg.acc_mean, agg.acc_ci)} | {_num(agg.effective_seeds)} | "
            f"{_cell(agg.resampling)} |"
        )
    if leaks:
        lines += ["", ("† **Leakage:** these rows were benchmarked although the leakage guard "
                       "found test or validation data in pretraining (`evaluation.allow_leakage: "
                       "true`); they are not held-out estimates:"), ""]
        for (task, init), note in sorted(leaks.items()):
            lines.append(f"- {_cell(task)} / {_cell(init)}: {_words(note)}")
    return "\n".join(lines) + "\n"


def _leakage_notes(results: Results) -> dict[tuple[str, str], str]:
    """(task, init) -> the leakage note its rows carry (finetune/leakage_guard.py writes it)."""
    return {(r.task, r.init): r.leakage for r in results.rows if getattr(r, "leakage", "")}


def _words(text: str) -> str:
    """A note medssl wrote, kept to plain words and numbers (no path can pass)."""
    kept = [w for w in str(text).split() if re.fullmatch(r"[A-Za-z0-9_.,;:()%=+<>'-]{1,40}", w)
            and "/" not in w]
    return " ".join(kept)[:400]


def _intended_use(volume: bool = False) -> str:
    # No ImageNet weights exist for a 3-D network: the baselines there are random weights and
    # MONAI's own self-supervised Swin UNETR encoder.
    against = ("random initialisation (and, for Swin UNETR, MONAI's self-supervised weights)"
               if volume else "ImageNet and random initialisation")
    return (
        "## Intended use\n\n"
        f"Initialisation for fine-tuning or linear probing on medical-imaging research tasks, "
        f"and comparison against {against}. Evaluate on your own "
        "held-out, patient-disjoint data before drawing conclusions.\n"
    )


def _limitations(info: CardInfo) -> str:
    return (
        "## Limitations\n\n"
        f"- Trained on the data summarised above only ({info.modality or 'unspecified modality'}); "
        "other scanners, sites, populations and modalities may behave differently.\n"
        "- Self-supervised features encode what the augmentations leave invariant; small "
        "findings can be lost to crops and blur. MAE weights are best judged by fine-tuning.\n"
        "- Benchmark numbers, if shown, come from the listed tasks and seeds and carry the "
        "stated uncertainty; they are not a clinical performance claim.\n"
        + ("- 3-D: the weights expect volumes resampled to the voxel size above in RAS order, "
           "cropped or resized to the input cube; other spacings or orientations change what "
           "the features mean.\n" if info.volume else "")
        + "- **Not for clinical use.**\n"
    )


def _how_to_load(info: CardInfo) -> str:
    if info.volume:
        from medssl.card_volume import how_to_load

        return how_to_load(info.in_chans, info.volume)
    source = f"hf-hub:{info.repo_id}" if info.repo_id else "local-dir:/path/to/this/folder"
    snippet = (
        "import timm\n\n"
        f"model = timm.create_model(\"{source}\", pretrained=True)\n"
        "model.eval()  # features: model(x) -> [B, model.num_features]\n"
        "cfg = timm.data.resolve_data_config({}, model=model)  # input size, mean, std\n"
    )
    text = ("## How to load\n\nWith plain timm (`config.json` holds the architecture and its "
            f"arguments: {info.in_chans} input channel(s){_args_words(info)}); check `SHA256SUMS` "
            "first (`sha256sum -c SHA256SUMS`).\n\n```python\n" + snippet + "```\n")
    if info.repo_id:
        text += ("\nA downloaded copy loads the same way with `local-dir:` and the folder's path.\n")
    else:
        text += ("\nPushed to the Hugging Face Hub, the same line loads it as `hf-hub:ORG/NAME`.\n")
    return text


def _args_words(info: CardInfo) -> str:
    extra = ", ".join(f"{k}={v!r}" for k, v in sorted(info.model_args.items())
                      if k not in ("in_chans", "num_classes", "global_pool"))
    return f", {extra}" if extra else ""


def _metric(mean: float | None, ci: list[float | None]) -> str:
    if not isinstance(mean, (int, float)) or not math.isfinite(mean):
        return "–"
    if len(ci) == 2 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in ci):
        return f"{mean:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{mean:.3f}"


def _num(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "–"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    return "–"


def _code(value: Any) -> str:
    """A data-derived token, or '?' when it does not look like a short code."""
    text = str(value)
    return text if _CODE.match(text) else "?"


def _digest(value: Any) -> str:
    """A hex digest, or '?' (nothing else may pass as one onto the card)."""
    text = str(value or "")
    return text if re.fullmatch(r"[0-9a-f]{8,128}", text) else "?"


def _format(value: Any) -> str:
    return str(value) if _FORMAT.match(str(value)) else "?"


def _cell(value: Any) -> str:
    """A table cell; a path-like value (e.g. init ``ssl:/data/run/published``) keeps only its
    last component, so no folder name reaches the card."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _num(value)
    text = str(value) if value is not None else "–"
    if "/" in text or "\\" in text:
        prefix = text.split(":", 1)[0] + ":" if re.match(r"^[a-z]+:", text) else ""
        text = prefix + re.split(r"[/\\]", text.rstrip("/\\"))[-1]
    return text.replace("|", "/").replace("\n", " ")[:80]
