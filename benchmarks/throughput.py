"""Pretraining throughput per method: is the step fed? Each measurement, in samples per second:

1. bare      - a plain PyTorch loop (forward, backward, the method's own update hooks such as
               DINO's EMA, optimizer step) of the same SSL module on ready views already on
               the device: the yardstick for "no lower than";
2. model     - our training step (``Pretrainer.step``: accumulation, clipping, all-rank finite
               check, schedule) on the same ready views;
3. aug       - the device augmentation alone (every view of a loader batch), to show where
               time goes when model+aug falls behind model;
4. model+aug - our step on a loader batch already on the device, augmented on the device;
5. end2end   - our step fed from real shards through the CPU loader and device augmentation.

It prints ``model / bare`` (target >= 1.0) and ``end2end / bare`` (target >= 0.90 on one GPU,
bf16, compiled), and ``end2end / model``. ``--preset`` runs the issue's methods at their real
sizes (``--tiny`` shrinks them for a CPU); the ready views have exactly the shapes the
augmentation produces, so DINO's multi-crop and MICLe's same-patient pairs are measured as
they train:

    simclr  SimCLR, ResNet-50, 2 x 224 px
    mae     MAE, ViT-B/16, 224 px, 75% masked
    dino    DINO, ViT-S/16, 2 x 224 px global + 6 x 96 px local crops
    micle   SimCLR on same-patient pairs (data.positives=same_patient), ResNet-50, 2 x 224 px
    simclr3d  SimCLR on volumes, MONAI 3-D ResNet-18, 2 x 96^3 voxel views from 112^3 cubes
    mae3d     MAE on volumes, MONAI MaskedAutoEncoderViT (ViT-B, 16^3 patches), 96^3, 75% masked

Volume presets read volume shards (``vol.npy.gz``; generated unless --volume-shards), and
their CPU loader emits ``--volume-size`` cubes (default 7/6 of the crop side).

    # GPU node, every method, full size (shards generated into a temp dir unless --shards)
    python benchmarks/throughput.py --preset all --device cuda --batch 256 --load-size 256 \
        --workers 15 --steps 40 --compile
    # CPU, every method, tiny
    OMP_NUM_THREADS=1 python benchmarks/throughput.py --preset all --tiny --device cpu \
        --batch 16 --load-size 40 --workers 1 --steps 10 --warmup 2 --precision no
    # GPU node, the volume methods only
    python benchmarks/throughput.py --preset simclr3d,mae3d --device cuda --batch 64 --workers 15 \
        --steps 30 --compile
    # one custom configuration
    python benchmarks/throughput.py --method simclr --arch resnet10t --size 32 --set augment.blur_p=0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medssl.config import load_config
from medssl.logging import setup_logging
from medssl.volume_models import is_volume_arch
from pretrain.config import PretrainConfig
from pretrain.resolve import resolve_method_defaults

log = logging.getLogger("medssl.benchmark")


class Preset(NamedTuple):
    """One method at the size the issue measures it, and its tiny CPU stand-in."""

    method: str
    arch: str
    size: int
    overrides: tuple[str, ...] = ()
    tiny_arch: str = "resnet10t"
    tiny_overrides: tuple[str, ...] = ()
    volume: bool = False   # a monai:<Net> on volume shards; size is the cube side


_TINY_VIT = "model.kwargs={patch_size: 8, depth: 2}"
PRESETS = {
    "simclr": Preset("simclr", "resnet50", 224),
    "mae": Preset("mae", "vit_base_patch16_224", 224, tiny_arch="vit_tiny_patch16_224",
                  tiny_overrides=(_TINY_VIT, "method.decoder_dim=32", "method.decoder_depth=1",
                                  "method.decoder_heads=4")),
    "dino": Preset("dino", "vit_small_patch16_224", 224,
                   overrides=("model.kwargs={dynamic_img_size: true}", "augment.local_crops=6",
                              "augment.local_crop_size=96"),
                   tiny_arch="vit_tiny_patch16_224",
                   tiny_overrides=("model.kwargs={patch_size: 8, depth: 2, dynamic_img_size: true}",
                                   "augment.local_crops=6", "augment.local_crop_size=16",
                                   "method.head_hidden_dim=64", "method.head_bottleneck_dim=32",
                                   "method.head_output_dim=256")),
    "micle": Preset("simclr", "resnet50", 224, overrides=("data.positives=same_patient",)),
    "simclr3d": Preset("simclr", "monai:ResNet", 96, volume=True,
                       overrides=("model.kwargs={block: basic, layers: [2, 2, 2, 2], "
                                  + "block_inplanes: [64, 128, 256, 512]}",),
                       tiny_arch="monai:ResNet",
                       tiny_overrides=("model.kwargs={block: basic, layers: [1, 1, 1, 1], "
                                       + "block_inplanes: [8, 16, 32, 64]}",)),
    "mae3d": Preset("mae", "monai:MaskedAutoEncoderViT", 96, volume=True,
                    overrides=("model.kwargs={patch_size: 16, hidden_size: 768, mlp_dim: 3072, num_layers: 12, "
                               + "num_heads: 12, decoder_mlp_dim: 2048}", "method.decoder_dim=384",
                               "method.decoder_depth=8", "method.decoder_heads=12"),
                    tiny_arch="monai:MaskedAutoEncoderViT",
                    tiny_overrides=("model.kwargs={patch_size: 8, hidden_size: 48, mlp_dim: 96, num_layers: 2, "
                                    + "num_heads: 4, decoder_mlp_dim: 96}", "method.decoder_dim=48",
                                    "method.decoder_depth=1", "method.decoder_heads=4")),
}
TINY_SIZE = 32
IMAGES_PER_PATIENT = 4   # generated shards: consecutive slices of one patient, as `medssl shard` writes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", help=f"comma list of {', '.join(PRESETS)}, or all; overrides "
                                    "--method/--arch/--size")
    p.add_argument("--tiny", action="store_true", help="presets at CPU size (32 px, tiny models)")
    p.add_argument("--method", default="simclr")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--in-chans", type=int, default=1)
    p.add_argument("--model-kwargs", default="{}", help="JSON timm kwargs, e.g. '{\"patch_size\": 8}'")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra pretrain config override (repeatable), e.g. data.positives=same_patient")
    p.add_argument("--batch", type=int, default=256, help="batch per step (one process)")
    p.add_argument("--size", type=int, default=224, help="crop size fed to the model (px)")
    p.add_argument("--load-size", type=int, default=256, help="size the CPU loader emits (px)")
    p.add_argument("--volume-size", type=int, help="cube side the CPU loader emits for volume presets "
                                                   "(default: 7/6 of the crop side)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile, loader start)")
    p.add_argument("--rounds", type=int, default=3,
                   help="measure all kinds in turn this many times and keep each one's best "
                        "(shared or throttled machines drift; interleaving keeps the ratios fair)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--compile", action="store_true")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "no"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shards", help="shard folder/glob; default: generate random scans in a temp dir")
    p.add_argument("--gen-shards", type=int, default=0, help="shards to generate (default 2 x workers)")
    p.add_argument("--gen-samples", type=int, default=128, help="samples per generated shard")
    p.add_argument("--gen-volumes", type=int, default=16, help="volumes per generated volume shard")
    p.add_argument("--volume-shards", help="volume shard folder/glob for the volume presets; default: generate")
    p.add_argument("--gen-volume-side", type=int,
                   help="side of generated volumes (default 1.25 x the loader's cube, so the CPU resize "
                        "runs as for real scans; a 1.5 mm CT is ~256 x 256 x 150)")
    p.add_argument("--skip", default="", help="comma list of measurements to skip: bare,model,aug,e2e")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if args.preset:
        names = list(PRESETS) if args.preset == "all" else args.preset.split(",")
        unknown = [n for n in names if n not in PRESETS]
        if unknown:
            p.error(f"--preset: unknown {', '.join(unknown)}; known: {', '.join(PRESETS)}, all")
        args.preset = names
    return args


def make_shards(out: Path, n_shards: int, per_shard: int, size: int, seed: int = 0) -> str:
    """Random CT-like uint16 slices in the real shard format (format only; content is noise),
    ``IMAGES_PER_PATIENT`` consecutive slices per patient so same-patient pairing has partners."""
    import webdataset as wds

    from medssl.data.sample import encode_intensity, encode_png

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    body = xx**2 / 0.16 + yy**2 / 0.12 < 1
    for s in range(n_shards):
        with wds.TarWriter(str(out / f"train-{s:06d}.tar")) as sink:
            for i in range(per_shard):
                hu = np.where(body, rng.normal(40, 60, (size, size)), -1000).astype(np.int16)
                stored, offset, slope = encode_intensity(hu)
                patient = (s * per_shard + i) // IMAGES_PER_PATIENT
                meta = {"modality": "CT", "channels": 1, "window": {"center": 40.0, "width": 400.0},
                        "intensity": {"offset": offset, "slope": slope, "unit": "HU"},
                        "patient": f"{patient:016x}", "study": f"{patient:016x}-0"}
                sink.write({"__key__": f"b{s:04d}-{i:08d}", "img.png": encode_png(stored),
                            "json": json.dumps(meta).encode()})
    shards = {f"train-{s:06d}.tar": {"split": "train", "samples": per_shard} for s in range(n_shards)}
    (out / "index.json").write_text(json.dumps({"format": "medssl-shards/1", "shards": shards}))
    return str(out)


def make_volume_shards(out: Path, n_shards: int, per_shard: int, size: int, seed: int = 0) -> str:
    """Random CT-like uint16 volumes (``vol.npy.gz``, a body ellipsoid of noise in air) in the
    volume shard format, ``IMAGES_PER_PATIENT`` volumes per patient; format only."""
    import webdataset as wds

    from medssl.data.sample import VOLUME_MEMBER, encode_intensity, encode_volume

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size + 8, size + 4, size)     # not a cube: the loader's centre crop runs too
    grid = np.meshgrid(*[np.arange(n) / n - 0.5 for n in shape], indexing="ij", sparse=True)
    body = grid[0] ** 2 / 0.16 + grid[1] ** 2 / 0.12 + grid[2] ** 2 / 0.2 < 1
    for s in range(n_shards):
        with wds.TarWriter(str(out / f"train-{s:06d}.tar"), encoder=False) as sink:
            for i in range(per_shard):
                hu = np.where(body, rng.normal(40, 60, shape), -1000).astype(np.int16)
                stored, offset, slope = encode_intensity(hu)
                patient = (s * per_shard + i) // IMAGES_PER_PATIENT
                meta = {"modality": "CT", "channels": 1, "spacing": [1.5, 1.5, 2.0],
                        "window": {"center": 40.0, "width": 400.0},
                        "intensity": {"offset": offset, "slope": slope, "unit": "HU"},
                        "patient": f"{patient:016x}", "study": f"{patient:016x}-0"}
                sink.write({"__key__": f"v{s:04d}-{i:08d}", VOLUME_MEMBER: encode_volume(stored),
                            "json": json.dumps(meta).encode()})
    shards = {f"train-{s:06d}.tar": {"split": "train", "samples": per_shard} for s in range(n_shards)}
    (out / "index.json").write_text(json.dumps({"format": "medssl-shards/1", "shards": shards,
                                                "config": {"volumes": True}}))
    return str(out)


def timed(fn: Callable[[int], Any], warmup: int, steps: int, batch: int, device: torch.device) -> float:
    """Samples/s of ``fn(step)`` over ``steps`` calls after ``warmup`` untimed ones."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for i in range(warmup):
        fn(i)
    sync()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        fn(i)
    sync()
    return steps * batch / (time.perf_counter() - t0)


def run_config(args: argparse.Namespace, shards: str, out: str, preset: Preset | None) -> PretrainConfig:
    """The pretrain config one measurement runs: the preset (or --method/--arch/--size), then --set."""
    if preset is None:
        method, arch, size = args.method, args.arch, args.size
        extra = [f"model.kwargs={args.model_kwargs}"]
    elif args.tiny:
        method, arch, size, extra = preset.method, preset.tiny_arch, TINY_SIZE, list(preset.tiny_overrides)
    else:
        method, arch, size, extra = preset.method, preset.arch, preset.size, list(preset.overrides)
    if is_volume_arch(arch):
        cube = max(args.volume_size or round(size * 7 / 6), size)
        sizes = [f"augment.volume_crop_size={size}", f"data.volume_size={cube}"]
    else:
        sizes = [f"augment.crop_size={size}", f"data.load_size={max(args.load_size, size)}"]
    return resolve_method_defaults(load_config(PretrainConfig, None, [
        f"output_dir={out}", f"data.shards={shards}", f"method.name={method}",
        f"model.arch={arch}", f"model.in_chans={args.in_chans}", *sizes,
        f"data.num_workers={args.workers}", f"train.batch_size={args.batch}",
        f"train.precision={args.precision}", f"train.compile={str(args.compile).lower()}",
        "train.channels_last=true", "train.max_steps=1000000", "data.shuffle_buffer=256",
        *extra, *args.set,
    ]))


def measure(args: argparse.Namespace, cfg: PretrainConfig, shards: str) -> dict[str, float]:
    """Every kind not in --skip for one config, best of --rounds interleaved rounds."""
    from accelerate import Accelerator

    from pretrain.data import build_loader, resolve_shards
    from pretrain.optim import build_optimizer
    from pretrain.trainer import Pretrainer, _precision
    from pretrain.volumes import is_volume, memory_format

    skip = set(filter(None, args.skip.split(",")))
    accelerator = Accelerator(mixed_precision=_precision(cfg.train.precision), cpu=args.device == "cpu")
    device = accelerator.device
    trainer = Pretrainer(cfg, accelerator)
    b = cfg.train.batch_size
    loader = build_loader(resolve_shards(shards), rank=0, world_size=1, local_batch=b, seed=0,
                          data_cfg=cfg.data, in_chans=cfg.model.in_chans, skip_batches=0,
                          pin_memory=device.type == "cuda", volume=is_volume(cfg))
    it = iter(loader)
    # One real loader batch on the device: its keys (a pair's partner image, patient groups)
    # and the views it augments to (DINO's local crops) are what the method trains on.
    batch = {k: v.to(device) for k, v in next(it).items()}
    groups = batch.get("group")
    generator = torch.Generator(device=device).manual_seed(0)
    views = [torch.randn_like(v) for v in trainer.augment(batch, generator)]
    log.info("device %s, precision %s, %s %s, batch %d, views %s, compile=%s", device,
             accelerator.mixed_precision, cfg.method.name, cfg.model.arch, b,
             "+".join("x".join(map(str, v.shape[2:])) for v in views), cfg.train.compile)
    kinds: dict[str, Callable[[int], Any]] = {}

    if "bare" not in skip:
        # The same memory layout as the trainer's (NHWC, or NDHWC for volumes).
        module = trainer.spec.build(cfg).to(device, memory_format=memory_format(cfg) or torch.preserve_format)
        optimizer = build_optimizer(module, cfg.train)
        before = getattr(module, "before_optimizer_step", None)
        after = getattr(module, "after_optimizer_step", None)
        if args.compile:
            module.compile()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)

        def bare_step(i: int) -> None:
            ctx = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
            with ctx:
                loss = module(views, groups)["loss"]
            loss.backward()
            if before is not None:
                before(i)
            optimizer.step()
            if after is not None:
                after(i)
            optimizer.zero_grad(set_to_none=True)

        kinds["bare"] = bare_step
    if "model" not in skip:
        kinds["model"] = lambda i: trainer.step([views], i, augment=False)
    if "aug" not in skip:
        kinds["aug"] = lambda i: trainer.augment(batch, generator)
        kinds["model+aug"] = lambda i: trainer.step([batch], i)
    if "e2e" not in skip:
        kinds["end2end"] = lambda i: trainer.step([next(it)], i)

    results: dict[str, float] = {}
    for r in range(args.rounds):
        for name, fn in kinds.items():
            rate = timed(fn, args.warmup if r == 0 else 1, args.steps, b, device)
            log.info("round %d: %s %.1f samples/s", r + 1, name, rate)
            results[name] = max(rate, results.get(name, 0.0))
    for num, den in (("model", "bare"), ("end2end", "bare"), ("end2end", "model")):
        if num in results and den in results:
            results[f"{num}/{den}"] = results[num] / results[den]
    return results


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Measure every preset (or the one --method configuration); returns figures by name."""
    args = parse_args(argv)
    setup_logging()
    if args.device == "cpu":
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    tmp = tempfile.TemporaryDirectory(prefix="medssl-bench-")
    names = args.preset or [args.method]
    volume_runs = [PRESETS[n].volume for n in names] if args.preset else [is_volume_arch(args.arch)]
    shards = args.shards
    if shards is None and not all(volume_runs):
        n = args.gen_shards or 2 * max(1, args.workers)
        size = max(args.load_size, TINY_SIZE if args.tiny else args.size)
        log.info("writing %d shards x %d random %d px slices to %s", n, args.gen_samples, size, tmp.name)
        shards = make_shards(Path(tmp.name), n, args.gen_samples, size)
    volume_shards = args.volume_shards
    if volume_shards is None and any(volume_runs):
        n = args.gen_shards or 2 * max(1, args.workers)
        crop = TINY_SIZE if args.tiny else (PRESETS["simclr3d"].size if args.preset else args.size)
        side = args.gen_volume_side or round(1.25 * max(args.volume_size or 0, round(crop * 7 / 6)))
        log.info("writing %d volume shards x %d random ~%d^3 volumes", n, args.gen_volumes, side)
        volume_shards = make_volume_shards(Path(tmp.name) / "volumes", n, args.gen_volumes, side)
    figures: dict[str, dict[str, float]] = {}
    for name in names:
        preset = PRESETS[name] if args.preset else None
        volume = preset.volume if preset else is_volume_arch(args.arch)
        source = volume_shards if volume else shards
        cfg = run_config(args, source, f"{tmp.name}/run-{name}", preset)
        results = figures[name] = measure(args, cfg, source)
        views = f"{cfg.augment.volume_crop_size}^3 vox" if volume else f"{cfg.augment.crop_size}px"
        if getattr(cfg.augment, "local_crops", 0):
            views += f" + {cfg.augment.local_crops}x{cfg.augment.local_crop_size}px"
        summary = "  ".join(f"{k}={v:.3f}" if "/" in k else f"{k}={v:.1f}/s" for k, v in results.items())
        print(f"throughput [{args.device}, {name}: {cfg.method.name} {cfg.model.arch} {views}, "
              f"batch {cfg.train.batch_size}, {args.workers} workers, compile={args.compile}]: {summary}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": figures},
                                        indent=1, default=str))
    tmp.cleanup()
    return figures


if __name__ == "__main__":
    main()
