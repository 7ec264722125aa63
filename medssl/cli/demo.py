"""``medssl demo``: the whole product on the embedded synthetic corpus, on a laptop-class CPU.

It runs the same commands a user would, in order, each into its own folder under ``out``:

    medssl synth   out/corpus
    medssl shard   out/corpus --out out/shards --recipe datasets/recipes/demo.yaml
    medssl pretrain configs/demo.yaml output_dir=out/pretrain data.shards=out/shards
    medssl publish out/pretrain --out out/published
    medssl pretrain configs/demo_from_imagenet.yaml output_dir=out/pretrain-from-imagenet ...
    medssl publish out/pretrain-from-imagenet --out out/published-from-imagenet
    medssl finetune configs/finetune/demo.yaml output_dir=out/benchmark ...
    medssl publish out/pretrain --out out/published --results out/benchmark/results.json
    (and the same for out/published-from-imagenet)

``medssl demo --volumes`` runs the 3-D path the same way, into ``medssl-demo-3d`` by default:

    medssl synth   out/corpus --volumes
    medssl shard   out/corpus --out out/shards --volumes --recipe datasets/recipes/demo_volumes.yaml
    medssl pretrain configs/demo_volumes.yaml output_dir=out/pretrain data.shards=out/shards
    medssl publish out/pretrain --out out/published
    medssl finetune configs/finetune/demo3d.yaml output_dir=out/benchmark ...
    medssl publish out/pretrain --out out/published --results out/benchmark/results.json

Every stage is resumable, so re-running the demo after an interruption finishes the job
instead of starting over.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import time
from pathlib import Path

from medssl.errors import MedsslError

log = logging.getLogger(__name__)

NAME = "demo"
HELP = "the whole product on the synthetic corpus, on a CPU: synth, shard, pretrain, publish, finetune"

#: Corpus of the demo: many patients with few slices each. 480 patients give SimCLR about 1,100
#: unlabeled train slices and the patient-level val and test splits about 400 slices each, so
#: the intervals are narrow enough to read (at 160 patients the test split held 152 slices and
#: every SSL - random interval crossed zero). Synth + shard take about 20 s on two cores.
DEMO_PATIENTS = 480
DEMO_SLICES = 4
DEMO_SIZE = 128
DEMO_SPLITS = "train=0.6,val=0.2,test=0.2"


#: The 3-D demo's corpus: whole synthetic CT series (24 slices of 40 px), one per patient. 480
#: patients put about 90 in the test split; at 240 the SSL - random intervals of the linear
#: probe at 100% labels spanned 0.23 AUC. The synthetic scanner's voxels are about 10 mm
#: in-plane and 6.7 mm apart, so this spacing keeps them (40-46 x 40-46 x 24 voxels).
VOLUME_PATIENTS = 480
VOLUME_SPACING = "10,10,6.667"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="folder for every stage's output (default ./medssl-demo, or "
                        "./medssl-demo-3d with --volumes); re-run to resume")
    p.add_argument("--volumes", action="store_true",
                   help="the 3-D path: whole CT series as volumes, 3-D SimCLR on a MONAI ResNet")


def run(args: argparse.Namespace) -> int:
    if args.volumes:
        return run_demo(args.out or Path("medssl-demo-3d"), volumes=True)
    return run_demo(args.out or Path("medssl-demo"))


def run_command(argv: list[str]) -> int:
    """Run ``medssl ARGV`` through the same command modules a user's command line reaches."""
    from medssl.cli import finetune, pretrain, publish, shard, synth

    command = {m.NAME: m for m in (synth, shard, pretrain, publish, finetune)}[argv[0]]
    parser = argparse.ArgumentParser(prog=f"medssl {command.NAME}")
    command.add_arguments(parser)
    return command.run(parser.parse_args(argv[1:]))


def repo_root() -> Path:
    """The checkout holding ``configs/`` and ``datasets/`` (medssl runs from a checkout)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "configs" / "demo.yaml").is_file():
        raise MedsslError(
            f"{root}: configs/demo.yaml not found; run the demo from a medssl checkout "
            "installed with pip install -e ."
        )
    return root


def run_demo(out: Path, volumes: bool = False) -> int:
    """Run synth -> shard -> pretrain -> publish -> finetune into ``out``; returns an exit code."""
    root = repo_root()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    # The corpus is synthetic, so a fixed salt is harmless, and it makes the patient splits --
    # and so the demo's table -- the same on every machine. Real data gets a secret salt.
    salt = out / "demo.salt"
    if not salt.is_file():
        salt.write_bytes(hashlib.sha256(b"medssl synthetic demo corpus").digest())
    stages = volume_stages(root, out, salt) if volumes else slice_stages(root, out, salt)
    return _run_stages(stages, out)


def slice_stages(root: Path, out: Path, salt: Path) -> list[tuple[str, list[str]]]:
    """The 2-D demo: slices, SimCLR from scratch and from ImageNet, four inits benchmarked."""
    corpus, shards = out / "corpus", out / "shards"
    run_dir, published, bench = out / "pretrain", out / "published", out / "benchmark"
    # Continued pretraining: the same recipe, started from ImageNet weights.
    run_dir_in, published_in = out / "pretrain-from-imagenet", out / "published-from-imagenet"
    masks = out / "masks.npz"
    return [
        ("synthesise the demo corpus", [
            "synth", str(corpus), "--patients", str(DEMO_PATIENTS),
            "--slices", str(DEMO_SLICES), "--size", str(DEMO_SIZE),
        ]),
        ("de-identify and shard it", [
            "shard", str(corpus), "--out", str(shards),
            "--recipe", str(root / "datasets" / "recipes" / "demo.yaml"), "--workers", "2",
            "--shard-size", "64", "--splits", DEMO_SPLITS, "--salt-file", str(salt),
            "--masks-out", str(masks),   # where the findings are: the explanations' truth
        ]),
        ("pretrain SimCLR on efficientnet_lite0", [
            "pretrain", str(root / "configs" / "demo.yaml"),
            f"output_dir={run_dir}", f"data.shards={shards}",
        ]),
        ("publish the weights", ["publish", str(run_dir), "--out", str(published)]),
        ("continue SimCLR from ImageNet weights", [
            "pretrain", str(root / "configs" / "demo_from_imagenet.yaml"),
            f"output_dir={run_dir_in}", f"data.shards={shards}",
        ]),
        ("publish those weights", ["publish", str(run_dir_in), "--out", str(published_in)]),
        ("benchmark SSL, ImageNet then SSL, ImageNet and random", [
            "finetune", str(root / "configs" / "finetune" / "demo.yaml"),
            f"output_dir={bench}",
            f"inits=[ssl:{published}, ssl:{published_in}, imagenet, random]",
            f"tasks=[{{name: demo, kind: shards, path: {shards}}}]",
            f"evaluation.explain.masks={masks}",
        ]),
        ("add the results to the model card", [
            "publish", str(run_dir), "--out", str(published),
            "--results", str(bench / "results.json"),
        ]),
        ("add the results to the second model card", [
            "publish", str(run_dir_in), "--out", str(published_in),
            "--results", str(bench / "results.json"),
        ]),
    ]


def volume_stages(root: Path, out: Path, salt: Path) -> list[tuple[str, list[str]]]:
    """The 3-D demo: whole series as volumes, 3-D SimCLR, SSL against random on the volumes."""
    corpus, shards = out / "corpus", out / "shards"
    run_dir, published, bench = out / "pretrain", out / "published", out / "benchmark"
    return [
        ("synthesise CT patients as whole series", [
            "synth", str(corpus), "--volumes", "--patients", str(VOLUME_PATIENTS),
        ]),
        ("resample each series to one volume and shard them", [
            "shard", str(corpus), "--out", str(shards), "--volumes", "--spacing", VOLUME_SPACING,
            "--recipe", str(root / "datasets" / "recipes" / "demo_volumes.yaml"),
            "--workers", "2", "--shard-size", "16", "--splits", DEMO_SPLITS,
            "--salt-file", str(salt),
        ]),
        ("pretrain 3-D SimCLR on a MONAI ResNet", [
            "pretrain", str(root / "configs" / "demo_volumes.yaml"),
            f"output_dir={run_dir}", f"data.shards={shards}",
        ]),
        ("publish the 3-D weights", ["publish", str(run_dir), "--out", str(published)]),
        ("benchmark 3-D SSL against random initialisation", [
            "finetune", str(root / "configs" / "finetune" / "demo3d.yaml"),
            f"output_dir={bench}", f"inits=[ssl:{published}, random]",
            f"tasks=[{{name: demo3d, kind: shards, path: {shards}}}]",
        ]),
        ("add the results to the model card", [
            "publish", str(run_dir), "--out", str(published),
            "--results", str(bench / "results.json"),
        ]),
    ]


def _run_stages(stages: list[tuple[str, list[str]]], out: Path) -> int:
    corpus, bench, published = out / "corpus", out / "benchmark", out / "published"
    started = time.perf_counter()
    for number, (what, argv) in enumerate(stages, start=1):
        log.info("demo step %d/%d: %s: medssl %s", number, len(stages), what, " ".join(argv))
        t0 = time.perf_counter()
        manifests = ("labels.csv", "volumes.csv")   # written last by synth (2-D, --volumes)
        if argv[0] == "synth" and any((corpus / m).is_file() for m in manifests):
            log.info("corpus already written; keeping it")
            continue
        try:
            code = run_command(argv)
        except MedsslError as exc:
            log.error("%s", exc)
            code = 2
        if code != 0:
            log.error("demo stopped at step %d (%s); re-run `medssl demo --out %s` to resume",
                      number, what, out)
            return code
        log.info("demo step %d done in %.0f s", number, time.perf_counter() - t0)

    report = bench / "report.md"
    log.info("demo finished in %.1f min", (time.perf_counter() - started) / 60)
    print(report.read_text() if report.is_file() else "")
    print(f"report: {report}\nplots:  {bench / 'plots'}\nweights: {published}")
    return 0
