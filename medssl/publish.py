"""``medssl publish RUN_DIR --out DIR``: a pretraining run -> timm-loadable weights + model card.

Reads ``RUN_DIR/config.yaml`` and the newest checkpoint of ``RUN_DIR/run.json`` (verified
against the sha256 recorded there; a run dir from before run.json: the one named by
``checkpoints/latest.txt``), refuses weights that are not all finite, and writes to ``DIR``:

- ``model.safetensors``: the timm backbone's state dict only (``num_classes=0``);
- ``config.json``: timm's hub layout plus modality, window and a ``medssl`` block;
- ``README.md``: the model card (medssl/card.py);
- ``SHA256SUMS``: ``sha256sum`` lines for the three files above, written last, so a publish
  that died half-way never verifies.

Re-publishing: ``DIR`` may be empty, absent, or a previous publish (holding only the four
files above); those files are replaced. Any other content makes publish refuse rather than
mix our files with someone else's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import threading
from pathlib import Path
from typing import Any


from medssl import __version__
from medssl.config import read_yaml_tree
from medssl.errors import MedsslError
from medssl.io import sha256_file
from medssl.results import Results
from medssl.rundir import (
    RECORD_NAME,
    checkpoint_problem,
    newest_intact,
    nonfinite_tensors,
    read_record,
    record_path,
)

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
SUMS = "SHA256SUMS"
PUBLISHED_FILES = (WEIGHTS, CONFIG, CARD, SUMS)
_HUB_HOST = ("huggingface.co", 443)

# Config keys a pretraining run may use; first one found wins. pretrain/ writes the first of
# each (augment.crop_size, normalization.*, data_intensity.*); the others keep publish lenient.
_SIZE_KEYS = ("model.kwargs.img_size", "model.img_size", "augment.crop_size", "augment.size",
              "data.image_size", "data.img_size", "data.crop_size")
_MEAN_KEYS = ("normalization.mean", "intensity.mean", "augment.mean")
_STD_KEYS = ("normalization.std", "intensity.std", "augment.std")
_WINDOW_KEYS = ("data_intensity.window", "intensity.window")
_MODALITY_KEYS = ("data_intensity.modality", "intensity.modality")
_LR_KEYS = ("train.lr", "train.learning_rate", "optim.lr", "optimizer.lr")
_LICENSE_KEYS = ("license", "publish.license", "model.license")
# timm.create_model kwargs outside model.kwargs that change the weights' shapes.
_TIMM_ARGS = ("img_size", "patch_size", "global_pool")
_DEFAULT_INTENSITY = "window then scale to [0,1], then (x - mean) / std"


def publish_command(
    run_dir: Path, out: Path, push_to_hub: str | None = None, results: Path | None = None
) -> int:
    """Publish the newest checkpoint of ``run_dir`` into ``out``; optionally push it. Returns 0."""
    run_dir, out = Path(run_dir), Path(out)
    if push_to_hub:
        _check_push_possible(push_to_hub)      # fail before any work, not after
    config = _read_run_config(run_dir)
    ckpt_path = _latest_checkpoint(run_dir)
    results_data = Results.read(results) if results is not None else None
    _check_out_dir(out, run_dir)

    import timm
    from safetensors.torch import save_file

    from medssl.card import CardInfo, build_card

    ckpt = _load_checkpoint(ckpt_path)
    model_cfg = config.get("model") or {}
    arch = model_cfg.get("arch")
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise MedsslError(f"{run_dir / 'config.yaml'}: model.arch {arch!r} is not a timm model name")
    in_chans = int(model_cfg.get("in_chans", 3))
    timm_args = _timm_args(model_cfg)

    backbone = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_chans, **timm_args)
    state = _backbone_state(ckpt, ckpt_path)
    bad = nonfinite_tensors(state)
    if bad:
        raise MedsslError(f"{ckpt_path}: {len(bad)} of {len(state)} backbone tensors hold NaN or "
                          f"infinity (first: {bad[0]}); refusing to publish non-finite weights")
    try:
        result = backbone.load_state_dict(state, strict=False)
    except RuntimeError as exc:   # shape mismatch: e.g. in_chans or kwargs differ from the run
        first = str(exc).strip().splitlines()[-1].strip()
        raise MedsslError(f"{ckpt_path}: backbone weights do not fit {arch} (in_chans={in_chans}, "
                          f"{timm_args or 'no kwargs'}): {first}") from None
    if result.missing_keys or result.unexpected_keys:
        bad = result.missing_keys[:3] or result.unexpected_keys[:3]
        raise MedsslError(
            f"{ckpt_path}: backbone weights do not fit {arch} (in_chans={in_chans}): "
            f"{'missing' if result.missing_keys else 'unexpected'} {bad}"
        )

    index, index_sha = _read_shard_index(config, run_dir)
    mean, std = _first(config, _MEAN_KEYS), _first(config, _STD_KEYS)
    if mean is None or std is None:
        log.warning("%s: no normalisation mean/std recorded; config.json and the card say 0.5/0.5",
                    run_dir / "config.yaml")
    mean = _per_channel(0.5 if mean is None else mean, in_chans, "normalization.mean")
    std = _per_channel(0.5 if std is None else std, in_chans, "normalization.std")
    size = _first(config, _SIZE_KEYS) or 224
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    window = _first(config, _WINDOW_KEYS)
    window = window if isinstance(window, dict) else None
    modality = _first(config, _MODALITY_KEYS) or _main_modality(index)
    described = config.get("intensity")
    described = described if isinstance(described, str) and described else _DEFAULT_INTENSITY
    method = str((config.get("method") or {}).get("name", "unknown"))
    steps = int(ckpt.get("step", 0))
    license_ = str(_first(config, _LICENSE_KEYS) or "other")
    git_sha = str(config.get("git_sha", "unknown"))
    model_args = {"in_chans": in_chans, "num_classes": 0, **timm_args}

    hub_config = _hub_config(backbone, arch, in_chans, size, mean, std, window, modality, license_,
                             model_args, method, steps, git_sha, index_sha, described)
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    lr, peak = _first(config, _LR_KEYS), _first(config, ("resolved.peak_lr",))
    train = dict(train, **({"lr": lr} if lr is not None else {}),
                 **({"peak_lr": peak} if peak is not None else {}))
    card = build_card(CardInfo(
        arch=arch, in_chans=in_chans, image_size=size, method=method, steps=steps, train=train,
        mean=mean, std=std, modality=modality, window=window, license=license_, git_sha=git_sha,
        medssl_version=__version__, index=index, index_sha256=index_sha, results=results_data,
        repo_id=push_to_hub, model_args=timm_args,
    ))

    out.mkdir(parents=True, exist_ok=True)
    (out / SUMS).unlink(missing_ok=True)    # an interrupted re-publish must not verify
    tensors = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    _write_text(out / CONFIG, json.dumps(hub_config, indent=2) + "\n")
    _write_text(out / CARD, str(card))
    write_sums(out, [WEIGHTS, CONFIG, CARD])
    n_params = sum(t.numel() for t in tensors.values())
    log.info("published %s (%s, %.1fM params, step %d) to %s", arch, method, n_params / 1e6, steps, out)

    if push_to_hub:
        _push(out, push_to_hub)
    return 0


def verify_published(directory: Path) -> None:
    """Check a published dir against its SHA256SUMS; raise MedsslError naming the bad file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MedsslError(f"{directory}: published dir not found")
    sums_path = directory / SUMS
    if not sums_path.is_file():
        raise MedsslError(f"{sums_path}: missing; not a complete medssl publish (re-run medssl publish)")
    listed: dict[str, str] = {}
    for n, line in enumerate(sums_path.read_text().splitlines(), 1):
        match = re.fullmatch(r"([0-9a-f]{64}) [ *]([^/\\]+)", line.strip())
        if not match or match.group(2) in (".", ".."):
            raise MedsslError(f"{sums_path}: line {n} is not '<sha256>  <file name>'")
        listed[match.group(2)] = match.group(1)
    for required in (WEIGHTS, CONFIG):
        if required not in listed:
            raise MedsslError(f"{sums_path}: does not list {required}; the dir cannot be trusted")
    for name, expected in listed.items():
        path = directory / name
        if not path.is_file():
            raise MedsslError(f"{path}: listed in {SUMS} but missing")
        if sha256_file(path) != expected:
            raise MedsslError(f"{path}: sha256 does not match {SUMS}; the file was changed or damaged")


def write_sums(directory: Path, names: list[str]) -> None:
    """Write ``SHA256SUMS`` (``sha256sum -c`` format) for ``names`` in ``directory``."""
    lines = "".join(f"{sha256_file(directory / name)}  {name}\n" for name in sorted(names))
    _write_text(directory / SUMS, lines)


# --- reading the run dir --------------------------------------------------------------------


def _read_run_config(run_dir: Path) -> dict[str, Any]:
    if not run_dir.is_dir():
        raise MedsslError(f"{run_dir}: run dir not found (give the output_dir of medssl pretrain)")
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise MedsslError(f"{path}: missing; is {run_dir} a medssl pretrain output_dir?")
    return read_yaml_tree(path)


def _latest_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint, verified against run.json (its size and sha256) when the run dir
    has one; a damaged newest checkpoint is refused, naming the newest intact one."""
    record = read_record(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if record is not None:
        if not record.checkpoints:
            raise MedsslError(f"{record_path(run_dir)}: lists no checkpoint; the run has not saved one yet")
        newest = max(record.checkpoints, key=lambda e: e.step)
        problem = checkpoint_problem(run_dir, newest)
        if problem is not None:
            intact, _ = newest_intact(run_dir, record)
            hint = (f"the newest intact checkpoint is {intact.file} (step {intact.step}); re-run medssl "
                    "pretrain to resume from it" if intact else "no recorded checkpoint is intact")
            raise MedsslError(f"{ckpt_dir / newest.file}: {problem}; not publishing it ({hint})")
        return ckpt_dir / newest.file
    log.warning("%s: no %s (a run dir from before medssl recorded checkpoint digests); the "
                "checkpoint's integrity cannot be verified", run_dir, RECORD_NAME)
    latest = ckpt_dir / "latest.txt"
    if not latest.is_file():
        raise MedsslError(f"{latest}: missing; the run has not saved a checkpoint yet")
    name = latest.read_text().strip()
    path = ckpt_dir / Path(name).name     # latest.txt names a file inside checkpoints/
    if not name or not path.is_file():
        raise MedsslError(f"{latest}: names {name!r}, which is not in {ckpt_dir}")
    return path


def _load_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MedsslError(f"{path}: cannot load as a weights-only checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise MedsslError(f"{path}: not a medssl checkpoint (no 'model' state dict)")
    return ckpt


def _backbone_state(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    prefix = ckpt.get("backbone_prefix", "backbone.")
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    if not state:
        raise MedsslError(f"{path}: no keys start with backbone_prefix {prefix!r}")
    return state


def _read_shard_index(config: dict[str, Any], run_dir: Path) -> tuple[dict | None, str | None]:
    """The training shards' index.json (parsed) and its sha256, or (None, None) with a warning."""
    spec = (config.get("data") or {}).get("shards")
    specs = spec if isinstance(spec, list) else [spec] if spec else []
    for item in specs:
        for base in (Path.cwd(), run_dir, run_dir.parent):
            folder = _shard_folder(str(item), base)
            if folder is not None and (folder / "index.json").is_file():
                raw = (folder / "index.json").read_bytes()
                try:
                    return json.loads(raw), hashlib.sha256(raw).hexdigest()
                except json.JSONDecodeError as exc:
                    raise MedsslError(f"{folder / 'index.json'}: not valid JSON ({exc})") from exc
    log.warning("data.shards index.json not found; the card will say provenance is not recorded")
    return None, None


def _shard_folder(spec: str, base: Path) -> Path | None:
    # data.shards is a folder, a glob or a brace pattern: the folder is the part before the
    # first wildcard (up to its last slash).
    head = re.split(r"[*?\[{]", spec, maxsplit=1)[0]
    path = Path(head) if Path(head).is_absolute() else base / head
    if head != spec:
        return path if head.endswith(("/", os.sep)) else path.parent
    if path.is_dir():
        return path
    return path.parent if path.is_file() else None


def _timm_args(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """timm.create_model kwargs the weights need: model.kwargs (pretrain's) plus known shape keys.

    Drop rates are left out, as timm's own exporter does: they change training, not weights.
    """
    kwargs = model_cfg.get("kwargs") if isinstance(model_cfg.get("kwargs"), dict) else {}
    args = {k: model_cfg[k] for k in _TIMM_ARGS if model_cfg.get(k) is not None}
    skip = ("in_chans", "num_classes", "pretrained", "drop_rate", "drop_path_rate", "drop_block_rate")
    args.update({k: v for k, v in kwargs.items() if k not in skip and not k.endswith("_drop_rate")})
    return args


def _main_modality(index: dict | None) -> str | None:
    modalities = (index or {}).get("modalities") or {}
    if not modalities:
        return None
    return "+".join(sorted(modalities, key=lambda m: -int(modalities[m] or 0)))


def _first(config: dict[str, Any], dotted: tuple[str, ...]) -> Any:
    for key in dotted:
        node: Any = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return node
    return None


def _per_channel(value: Any, in_chans: int, key: str) -> list[float]:
    values = value if isinstance(value, (list, tuple)) else [value]
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise MedsslError(f"config.yaml: {key} must be a number or a list of numbers, got {value!r}") from None
    if len(values) == 1:
        values = values * in_chans
    if len(values) != in_chans:
        raise MedsslError(f"config.yaml: {key} has {len(values)} values for {in_chans} channels")
    return values


# --- writing --------------------------------------------------------------------------------


def _hub_config(model: Any, arch: str, in_chans: int, size: int, mean: list[float],
                std: list[float], window: dict | None, modality: str | None, license_: str,
                model_args: dict[str, Any], method: str, steps: int, git_sha: str,
                index_sha: str | None, intensity: str) -> dict[str, Any]:
    # Written by hand rather than with timm's save_config_for_hf: its signature differs across
    # the timm>=1.0 range we support, and it copies the architecture's ImageNet tag, licence
    # and paper into pretrained_cfg, which would misdescribe these weights.
    base = model.pretrained_cfg
    pretrained_cfg = {
        "tag": f"medssl_{method}",
        "custom_load": False,
        "input_size": [in_chans, size, size],
        "in_chans": in_chans,
        "fixed_input_size": bool(base.get("fixed_input_size", False)),
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": mean,
        "std": std,
        "num_classes": 0,
        "first_conv": base.get("first_conv"),
        "classifier": base.get("classifier"),
        "license": license_,
        "modality": modality,
        "window": window,
        "intensity": intensity,
    }
    config = {
        "architecture": arch,
        "num_classes": 0,
        "num_features": int(model.num_features),
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
        "medssl": {"method": method, "steps": steps, "git_sha": git_sha,
                   "source_index_sha256": index_sha, "medssl_version": __version__},
    }
    pool = getattr(model, "global_pool", None)
    pool = getattr(pool, "pool_type", pool)
    if isinstance(pool, str) and pool:
        config["global_pool"] = pool
    return config


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


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --- Hugging Face Hub -----------------------------------------------------------------------


def _check_push_possible(repo: str) -> None:
    from huggingface_hub import get_token

    if not re.fullmatch(r"[\w.-]+/[\w.-]+|[\w.-]+", repo):
        raise MedsslError(f"--push-to-hub {repo!r}: not a repo id like 'org/name'")
    if hub_offline():
        raise MedsslError("--push-to-hub: HF_HUB_OFFLINE is set; unset it or publish locally only")
    if get_token() is None:
        raise MedsslError("--push-to-hub: no Hugging Face token; run `hf auth login` or set HF_TOKEN")
    if not hub_online():
        raise MedsslError("--push-to-hub: huggingface.co is not reachable from this machine; "
                          "publish locally and push from a machine with network access")


def _push(out: Path, repo: str) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=url.repo_id, folder_path=str(out), allow_patterns=list(PUBLISHED_FILES),
                          commit_message="medssl publish")
    except Exception as exc:  # HTTP, auth, network: one line; the local publish is complete
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MedsslError(f"--push-to-hub {repo}: upload failed ({first}); the published dir "
                          f"{out} is complete, push it later") from exc
    log.info("pushed %s to https://huggingface.co/%s", out, url.repo_id)


def hub_offline() -> bool:
    """True when the user asks for no Hub access (``HF_HUB_OFFLINE`` in the environment now).

    The environment is read at each call, not huggingface_hub's ``constants.HF_HUB_OFFLINE``,
    which is a snapshot taken when it was first imported: a process (or a test) that changes
    the variable afterwards must be obeyed as it is now.
    """
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_online(timeout_s: float = 3.0) -> bool:
    """True if the Hub is allowed and reachable within ``timeout_s`` (DNS included)."""
    if hub_offline():
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection(_HUB_HOST, timeout=timeout_s).close()
            result.append(True)
        except OSError:
            result.append(False)

    # getaddrinfo ignores socket timeouts; a daemon thread bounds a hanging DNS lookup too.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    return bool(result and result[0])


def hub_cache_dir() -> str:
    """The Hugging Face hub cache folder (``HF_HUB_CACHE``, else ``HF_HOME``/hub, else default)."""
    # Read the environment now, as for HF_HUB_OFFLINE: huggingface_hub fixed it at import.
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE
