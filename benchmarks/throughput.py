"""Pretraining throughput: is the step fed? One run measures, in samples per second:

1. bare      - a plain PyTorch loop (forward, backward, optimizer step) of the same SSL module on
               ready views already on the device: the yardstick for "no lower than";
2. model     - our training step (``Pretrainer.step``: accumulation, clipping, all-rank finite
               check, schedule) on the same ready views;
3. model+aug - our step on a uint16 batch already on the device, augmented on the device;
4. end2end   - our step fed from real shards through the CPU loader and device augmentation.

and prints ``end2end / model`` (target: >= 0.90 on a 16-core, one-GPU node for ResNet-50
SimCLR at 224 px, batch 256) and ``model / bare`` (target: >= 1.0).

    # GPU node, full size (shards generated into a temp dir unless --shards is given)
    python benchmarks/throughput.py --device cuda --arch resnet50 --batch 256 --size 224 \\
        --load-size 256 --workers 15 --steps 50 --compile
    # CPU, tiny
    python benchmarks/throughput.py --device cpu --arch resnet10t --batch 16 --size 32 \\
        --load-size 40 --workers 1 --steps 5 --warmup 2
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
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medssl.config import load_config  # noqa: E402
from medssl.logging import setup_logging  # noqa: E402
from pretrain.config import PretrainConfig  # noqa: E402
from pretrain.resolve import resolve_method_defaults  # noqa: E402

log = logging.getLogger("medssl.benchmark")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="simclr")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--in-chans", type=int, default=1)
    p.add_argument("--model-kwargs", default="{}", help="JSON timm kwargs, e.g. '{\"patch_size\": 8}'")
    p.add_argument("--batch", type=int, default=256, help="batch per step (one process)")
    p.add_argument("--size", type=int, default=224, help="crop size fed to the model (px)")
    p.add_argument("--load-size", type=int, default=256, help="size the CPU loader emits (px)")
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
    p.add_argument("--skip", default="", help="comma list of measurements to skip: bare,model,aug,e2e")
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p.parse_args(argv)


def make_shards(out: Path, n_shards: int, per_shard: int, size: int, seed: int = 0) -> str:
    """Random CT-like uint16 slices in the real shard format (format only; content is noise)."""
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
                meta = {"modality": "CT", "channels": 1, "window": {"center": 40.0, "width": 400.0},
                        "intensity": {"offset": offset, "slope": slope, "unit": "HU"}}
                sink.write({"__key__": f"b{s:04d}-{i:08d}", "img.png": encode_png(stored),
                            "json": json.dumps(meta).encode()})
    shards = {f"train-{s:06d}.tar": {"split": "train", "samples": per_shard} for s in range(n_shards)}
    (out / "index.json").write_text(json.dumps({"format": "medssl-shards/1", "shards": shards}))
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


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    setup_logging()
    if args.device == "cpu":
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    skip = set(filter(None, args.skip.split(",")))
    tmp = tempfile.TemporaryDirectory(prefix="medssl-bench-")
    shards = args.shards
    if shards is None and "e2e" not in skip:
        n = args.gen_shards or 2 * max(1, args.workers)
        log.info("writing %d shards x %d random %d px slices to %s", n, args.gen_samples, args.load_size, tmp.name)
        shards = make_shards(Path(tmp.name), n, args.gen_samples, args.load_size)
    cfg = resolve_method_defaults(load_config(PretrainConfig, None, [
        f"output_dir={tmp.name}/run", f"data.shards={shards or 'unused'}", f"method.name={args.method}",
        f"model.arch={args.arch}", f"model.in_chans={args.in_chans}", f"model.kwargs={args.model_kwargs}",
        f"augment.crop_size={args.size}", f"data.load_size={args.load_size}",
        f"data.num_workers={args.workers}", f"train.batch_size={args.batch}",
        f"train.precision={args.precision}", f"train.compile={str(args.compile).lower()}",
        "train.channels_last=true", "train.max_steps=1000000", "data.shuffle_buffer=256",
    ]))

    from accelerate import Accelerator

    from pretrain.data import build_loader, resolve_shards
    from pretrain.optim import build_optimizer
    from pretrain.trainer import Pretrainer, _precision

    accelerator = Accelerator(mixed_precision=_precision(cfg.train.precision), cpu=args.device == "cpu")
    device = accelerator.device
    trainer = Pretrainer(cfg, accelerator)
    n_views, b, c, s = trainer.spec.n_views, args.batch, args.in_chans, args.size
    views = [torch.randn(b, c, s, s, device=device).contiguous(memory_format=torch.channels_last)
             for _ in range(n_views)]
    results: dict[str, float] = {}
    kinds: dict[str, Callable[[int], Any]] = {}
    log.info("device %s, precision %s, %s %s, batch %d at %d px, compile=%s", device,
             accelerator.mixed_precision, args.method, args.arch, b, s, args.compile)

    if "bare" not in skip:
        bare = resolve_method_defaults(cfg).train
        module = trainer.spec.build(cfg).to(device, memory_format=torch.channels_last)
        optimizer = build_optimizer(module, bare)
        if args.compile:
            module.compile()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)

        def bare_step(_: int) -> None:
            ctx = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
            with ctx:
                loss = module(views)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        kinds["bare"] = bare_step

    if "model" not in skip:
        kinds["model"] = lambda i: trainer.step([views], i, augment=False)

    if "aug" not in skip:
        stored = torch.randint(0, 2000, (b, c, args.load_size, args.load_size), dtype=torch.int16, device=device)
        batch = {"image": stored, "offset": torch.full((b,), -1024.0, device=device),
                 "slope": torch.ones(b, device=device), "center": torch.full((b,), 40.0, device=device),
                 "width": torch.full((b,), 400.0, device=device)}
        kinds["model+aug"] = lambda i: trainer.step([batch], i)

    if "e2e" not in skip:
        urls = resolve_shards(shards)
        loader = build_loader(urls, rank=0, world_size=1, local_batch=b, seed=0, data_cfg=cfg.data,
                              in_chans=c, skip_batches=0, pin_memory=device.type == "cuda")
        it = iter(loader)
        kinds["end2end"] = lambda i: trainer.step([next(it)], i)

    for r in range(args.rounds):
        for name, fn in kinds.items():
            rate = timed(fn, args.warmup if r == 0 else 1, args.steps, b, device)
            log.info("round %d: %s %.1f samples/s", r + 1, name, rate)
            results[name] = max(rate, results.get(name, 0.0))

    if "model" in results and "end2end" in results:
        results["end2end/model"] = results["end2end"] / results["model"]
    if "model" in results and "bare" in results:
        results["model/bare"] = results["model"] / results["bare"]
    summary = "  ".join(f"{k}={v:.3f}" if "/" in k else f"{k}={v:.1f}/s" for k, v in results.items())
    print(f"throughput [{device.type}, {args.method} {args.arch}, batch {b}, {s}px, "
          f"{args.workers} workers, compile={args.compile}]: {summary}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results},
                                        indent=1, default=str))
    tmp.cleanup()
    return results


if __name__ == "__main__":
    main()
