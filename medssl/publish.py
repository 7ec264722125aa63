"""``medssl publish RUN_DIR --out DIR``: a pretraining run -> timm-loadable weights + model card.

A 3-D run (``model.arch: monai:<Net>``) publishes plain MONAI weights instead, with a
config.json naming the network and its kwargs (medssl/publish_volume.py, medssl/published.py).

Everything comes from the run record (``RUN_DIR/run.json``, medssl/rundir.py): architecture,
channels, input size, intensity handling, method, the shard folders read, and the checkpoint
(``--checkpoint``: the newest by default, the highest recorded RankMe, or a step), verified
against the sha256 recorded there; config.json and the card say which one and why. Weights
that are not all finite are refused. The published dir (its contract: medssl/published.py) gets ``model.safetensors``,
``config.json``, the model card ``README.md`` (medssl/card.py) and ``SHA256SUMS``, last.

Re-publishing: ``DIR`` may be empty, absent, or a previous publish (holding only the four
files above); those files are replaced. Any other content makes publish refuse rather than
mix our files with someone else's.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from medssl import __version__
from medssl.errors import MedsslError
from medssl.hub import check_push_possible, push
from medssl.io import atomic_write_text
from medssl.published import (
    CARD,
    CONFIG,
    PATIENTS,
    PUBLISHED_FILES,
    SUMS,
    WEIGHTS,
    hub_config,
    write_sums,
)
from medssl.results import Results
from medssl.rundir import (
    RECORD_NAME,
    CheckpointEntry,
    RunRecord,
    ShardSource,
    backbone_state,
    best_rankme,
    checkpoint_problem,
    load_checkpoint,
    newest_intact,
    nonfinite_tensors,
    read_record,
    record_path,
)

log = logging.getLogger(__name__)

#: timm.create_model kwargs that change training, not the weights' shapes (timm's own exporter
#: leaves them out too).
_TRAINING_ONLY_KWARGS = ("in_chans", "num_classes", "pretrained", "drop_rate", "drop_path_rate",
                         "drop_block_rate")


def publish_command(
    run_dir: Path, out: Path, push_to_hub: str | None = None, results: Path | None = None,
    checkpoint: str = "latest",
) -> int:
    """Publish a checkpoint of ``run_dir`` into ``out``; optionally push it. Returns 0.

    ``checkpoint``: ``latest`` (the newest), ``best-rankme`` (the highest RankMe recorded,
    train.eval_every, pretrain/monitor.py) or a step number.
    """
    run_dir, out = Path(run_dir), Path(out)
    if push_to_hub:
        check_push_possible(push_to_hub)      # fail before any work, not after
    record = _read_run_record(run_dir)
    entry = _newest_checkpoint(run_dir, record) if checkpoint == "latest" else _chosen(run_dir, record, checkpoint)
    chosen = {"step": entry.step, "chosen_by": "step" if checkpoint.isdigit() else checkpoint,
              "rankme": entry.rankme}
    results_data = Results.read(results) if results is not None else None
    _check_out_dir(out, run_dir)

    from safetensors.torch import save_file

    from medssl.card import CardInfo, VolumeCard, build_card
    from medssl.volume_models import is_volume_arch

    ckpt_path = run_dir / "checkpoints" / entry.file
    ckpt = load_checkpoint(ckpt_path)
    state = backbone_state(ckpt, ckpt_path)
    bad = nonfinite_tensors(state)
    if bad:
        raise MedsslError(f"{ckpt_path}: {len(bad)} of {len(state)} backbone tensors hold NaN or "
                          f"infinity (first: {bad[0]}); refusing to publish non-finite weights")
    volume = is_volume_arch(record.arch)
    if volume:
        from medssl.publish_volume import net_tensors, volume_backbone

        backbone = volume_backbone(record, state, ckpt_path)
        tensors = net_tensors(backbone)
        timm_args: dict[str, Any] = {}
    else:
        backbone, timm_args = _timm_backbone(record, state, ckpt_path)
        tensors = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}

    intensity = record.intensity
    mean = _per_channel(intensity.mean, record.in_chans, "intensity.mean")
    std = _per_channel(intensity.std, record.in_chans, "intensity.std")
    sources = record.latest_sources()
    index, index_sha = _training_index(sources)
    modality = intensity.modality or _main_modality(index)
    patients = _pretraining_patients(sources, entry.sha256)
    license_ = str(record.config.get("license") or "other")
    medssl_block = {
        "steps": entry.step, "git_sha": record.git_sha, "medssl_version": __version__,
        "modality": modality, "window": intensity.window, "intensity": intensity.pipeline,
        "source_index_sha256": index_sha, "started_from": record.started_from, "checkpoint": chosen,
        "pretraining_data": [{"split": s.split, "index_sha256": s.index_sha256,
                              "salt_id": s.salt_id, "shards": s.shards, "samples": s.samples}
                             for s in sources],
    }
    volume_card = None
    if volume:
        from medssl.publish_volume import input_cube, shard_spacing
        from medssl.published import volume_config

        cube, spacing = input_cube(record), shard_spacing(index, record)
        config_json = volume_config(record.arch, backbone.net_name, backbone.net_kwargs,
                                    backbone.num_features, record.in_chans, cube, mean, std,
                                    license_, record.method, spacing, medssl_block)
        volume_card = VolumeCard(net=backbone.net_name, kwargs=backbone.net_kwargs, cube=cube,
                                 spacing=spacing)
    else:
        config_json = hub_config(backbone, record.arch, record.in_chans, record.input_size, mean,
                                 std, license_, timm_args, record.method, medssl_block)
    train = dict(record.config.get("train") or {})
    if "peak_lr" in record.resolved:
        train["peak_lr"] = record.resolved["peak_lr"]
    card = build_card(CardInfo(
        arch=record.arch, in_chans=record.in_chans,
        image_size=volume_card.cube[0] if volume_card else record.input_size,
        method=record.method, steps=entry.step, train=train, mean=mean, std=std,
        modality=modality, window=intensity.window, license=license_, git_sha=record.git_sha,
        medssl_version=__version__, index=index, index_sha256=index_sha, sources=sources,
        results=results_data, repo_id=push_to_hub, model_args=timm_args,
        hashed_patients={s.index_sha256: len(s.hashes) for s in patients.sources} if patients else {},
        started_from=record.started_from, checkpoint=chosen, volume=volume_card,
    ))

    out.mkdir(parents=True, exist_ok=True)
    (out / SUMS).unlink(missing_ok=True)    # an interrupted re-publish must not verify
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    atomic_write_text(out / CONFIG, json.dumps(config_json, indent=2) + "\n")
    atomic_write_text(out / CARD, str(card))
    names = [WEIGHTS, CONFIG, CARD]
    if patients is not None:
        from medssl.leakage.patients import write_hashes

        write_hashes(out / PATIENTS, patients)
        names.append(PATIENTS)
    else:
        (out / PATIENTS).unlink(missing_ok=True)   # a previous publish's: it would not be listed
    write_sums(out, names)
    n_params = sum(t.numel() for t in tensors.values())
    log.info("published %s (%s, %.1fM params, step %d) to %s", record.arch, record.method,
             n_params / 1e6, entry.step, out)

    if push_to_hub:
        push(out, push_to_hub, tuple(n for n in PUBLISHED_FILES if (out / n).is_file()))
    return 0


# --- reading the run dir --------------------------------------------------------------------


def _read_run_record(run_dir: Path) -> RunRecord:
    if not run_dir.is_dir():
        raise MedsslError(f"{run_dir}: run dir not found (give the output_dir of medssl pretrain)")
    record = read_record(run_dir)
    if record is None:
        raise MedsslError(f"{record_path(run_dir)}: missing; is {run_dir} a medssl pretrain output_dir? "
                          "(a run dir from before run records: resume it once with medssl pretrain, "
                          "which records it)")
    return record


def _newest_checkpoint(run_dir: Path, record: RunRecord) -> CheckpointEntry:
    """The newest recorded checkpoint, verified (size, sha256, finite weights); a damaged one
    is refused, naming the newest intact one."""
    if not record.checkpoints:
        raise MedsslError(f"{record_path(run_dir)}: lists no checkpoint; the run has not saved one yet")
    newest = max(record.checkpoints, key=lambda e: e.step)
    problem = checkpoint_problem(run_dir, newest)
    if problem is not None:
        intact, _ = newest_intact(run_dir, record)
        hint = (f"the newest intact checkpoint is {intact.file} (step {intact.step}); re-run medssl "
                "pretrain to resume from it" if intact else "no recorded checkpoint is intact")
        raise MedsslError(f"{run_dir / 'checkpoints' / newest.file}: {problem}; not publishing it ({hint})")
    return newest


def _chosen(run_dir: Path, record: RunRecord, choice: str) -> CheckpointEntry:
    """The checkpoint ``--checkpoint best-rankme|STEP`` names, verified like the newest."""
    steps = ", ".join(str(e.step) for e in record.checkpoints) or "none"
    if choice == "best-rankme":
        entry = best_rankme(record.checkpoints)
        if entry is None:
            raise MedsslError(f"{record_path(run_dir)}: no checkpoint has a RankMe (the run had "
                              f"train.eval_every=0); publish --checkpoint latest or a step ({steps})")
    elif choice.isdigit():
        entry = next((e for e in record.checkpoints if e.step == int(choice)), None)
        if entry is None:
            raise MedsslError(f"{record_path(run_dir)}: no checkpoint at step {choice}; recorded steps: {steps}")
    else:
        raise MedsslError(f"--checkpoint {choice!r} must be latest, best-rankme or a step number")
    problem = checkpoint_problem(run_dir, entry)
    if problem is not None:
        raise MedsslError(f"{run_dir / 'checkpoints' / entry.file}: {problem}; not publishing it")
    return entry


def _timm_backbone(record: RunRecord, state: dict[str, Any], ckpt_path: Path) -> tuple[Any, dict[str, Any]]:
    """The recorded timm architecture (``num_classes=0``) with the checkpoint's backbone
    tensors loaded strictly, and the timm kwargs that shape it."""
    import timm

    if not timm.is_model(record.arch):
        raise MedsslError(f"{record_path(ckpt_path.parent.parent)}: arch {record.arch!r} is not a "
                          "timm model name (3-D backbones are monai:<Net>)")
    timm_args = {k: v for k, v in record.model_kwargs.items()
                 if k not in _TRAINING_ONLY_KWARGS and not k.endswith("_drop_rate")}
    backbone = timm.create_model(record.arch, pretrained=False, num_classes=0,
                                 in_chans=record.in_chans, **timm_args)
    _load_backbone(backbone, state, ckpt_path, record, timm_args)
    return backbone, timm_args


def _load_backbone(backbone: Any, state: dict[str, Any], path: Path, record: RunRecord,
                   timm_args: dict[str, Any]) -> None:
    try:
        result = backbone.load_state_dict(state, strict=False)
    except RuntimeError as exc:   # shape mismatch: in_chans or kwargs differ from the weights
        first = str(exc).strip().splitlines()[-1].strip()
        raise MedsslError(f"{path}: backbone weights do not fit {record.arch} (in_chans="
                          f"{record.in_chans}, {timm_args or 'no kwargs'}): {first}") from None
    if result.missing_keys or result.unexpected_keys:
        bad = result.missing_keys[:3] or result.unexpected_keys[:3]
        raise MedsslError(f"{path}: backbone weights do not fit {record.arch} (in_chans={record.in_chans}): "
                          f"{'missing' if result.missing_keys else 'unexpected'} {bad}")


def _training_index(sources: list[ShardSource]) -> tuple[dict | None, str | None]:
    """The first training shard folder's index.json and its sha256, when it is still the one
    the run read (same digest as recorded); otherwise (None, digest) with a warning."""
    for source in sources:
        path = Path(source.folder) / "index.json"
        if not path.is_file():
            continue
        raw = path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        if source.index_sha256 and digest != source.index_sha256:
            log.warning("%s: changed since the run read it; the card gives the recorded digest only",
                        path)
            return None, source.index_sha256
        try:
            return json.loads(raw), digest
        except json.JSONDecodeError as exc:
            raise MedsslError(f"{path}: not valid JSON ({exc})") from exc
    if sources:
        log.warning("the training shards' index.json is not reachable from here; the card gives "
                    "the recorded digests and counts only")
        return None, sources[0].index_sha256
    log.warning("%s records no training shard folder; the card will say provenance is not recorded",
                RECORD_NAME)
    return None, None


def _pretraining_patients(sources: list[ShardSource], checkpoint_sha256: str):
    """Keyed hashes of the patients of every shard folder pretraining read
    (``medssl.leakage.patients``), or None when no folder could be read as recorded.

    A folder is hashed whole or not at all (a partial list would undercount an overlap); one
    that moved, changed since the run read it, or records no salt is left out with a warning,
    and the card says which sources a benchmark can check.
    """
    from medssl.leakage.patients import hash_sources, nonce_for, shard_patients

    found = []
    for source in sources:
        path = Path(source.folder) / "index.json"
        if not (path.is_file() and source.index_sha256 and source.salt_id and source.split):
            log.warning("pretraining shards %s: not readable as recorded (index.json or salt id "
                        "missing); its patients are not hashed", source.folder)
            continue
        if hashlib.sha256(path.read_bytes()).hexdigest() != source.index_sha256:
            log.warning("%s: changed since the run read it; its patients are not hashed", path)
            continue
        try:
            by_split = shard_patients(source.folder, source.split.split("+"))
        except MedsslError as exc:
            log.warning("pretraining patients not hashed for one shard folder: %s", exc)
            continue
        found.append((source.index_sha256, source.salt_id, source.split,
                      set().union(*(set(c) for c in by_split.values()))))
    return hash_sources(nonce_for(checkpoint_sha256), found) if found else None


def _main_modality(index: dict | None) -> str | None:
    modalities = (index or {}).get("modalities") or {}
    if not modalities:
        return None
    return "+".join(sorted(modalities, key=lambda m: -int(modalities[m] or 0)))


def _per_channel(values: list[float], in_chans: int, key: str) -> list[float]:
    values = [float(v) for v in values]
    if len(values) == 1:
        values = values * in_chans
    if len(values) != in_chans:
        raise MedsslError(f"{RECORD_NAME}: {key} has {len(values)} values for {in_chans} channels")
    return values


def _check_out_dir(out: Path, run_dir: Path) -> None:
    if out.exists() and not out.is_dir():
        raise MedsslError(f"--out {out}: exists and is not a directory")
    if out.resolve() == run_dir.resolve():
        raise MedsslError(f"--out {out}: must not be the run dir itself")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in PUBLISHED_FILES)
        if others:
            raise MedsslError(f"--out {out}: holds files that are not a previous publish "
                              f"(e.g. {others[0]}); choose an empty or new directory")
