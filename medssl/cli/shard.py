"""``medssl shard INPUT... --out DIR``: de-identify scans into patient-split WebDataset shards."""

from __future__ import annotations

import argparse
from pathlib import Path

from medssl.data.budget import DEFAULT_MAX_PIXELS
from medssl.data.report import DEFAULT_MAX_BAD

NAME = "shard"
HELP = "de-identify scans (DICOM, NIfTI, PNG/JPEG/TIFF) and write patient-split WebDataset shards"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                   help="scan files or folders (walked recursively); with a --recipe, the "
                        "folder its manifest paths are relative to")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="shard folder to write; a re-run with the same arguments resumes or "
                        "reports it complete")
    p.add_argument("--recipe", type=Path, metavar="YAML",
                   help="datasets/recipes/NAME.yaml: manifest, patient column, labels, splits")
    p.add_argument("--attributes", metavar="NAME,...",
                   help="subgroup attributes to read from DICOM headers, coarsened: sex "
                        "(M/F/O), age (band; 90+ in the top band), site (salted pseudonym of "
                        "institution + station), scanner (manufacturer, model); default none")
    p.add_argument("--splits", default="train=0.8,val=0.1,test=0.1", metavar="NAME=FRACTION,...",
                   help="patient-level split fractions, summing to 1 (default train=0.8,val=0.1,test=0.1)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="reader processes (default 1); output bytes do not depend on it")
    p.add_argument("--salt-file", type=Path, metavar="FILE",
                   help="secret for pseudonyms (default: env MEDSSL_SALT, else <out>.salt beside "
                        "the shard folder, created once); keep it private and outside the folder")
    p.add_argument("--max-side", type=int, default=512, metavar="PX",
                   help="shrink images whose longer side exceeds PX pixels (default 512)")
    p.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per shard (default 1000)")
    p.add_argument("--report", type=Path, metavar="FILE",
                   help="per-input JSONL report (default <out>.report.jsonl, beside the folder: "
                        "it names source files, so never inside it)")
    p.add_argument("--masks-out", type=Path, metavar="FILE.npz",
                   help="also write the finding masks of the written samples, keyed by sample "
                        "key, to this file (evaluation.explain.masks reads it); needs a recipe "
                        "with masks: COLUMN. Never inside --out; an existing file is refused "
                        "unless this run wrote it")
    p.add_argument("--max-bad", type=float, default=DEFAULT_MAX_BAD, metavar="FRACTION",
                   help="exit 1 when more than this fraction (0..1) of the inputs is lost "
                        "(quarantined; rows a recipe's label policy drops on purpose do not count); "
                        f"default {DEFAULT_MAX_BAD}. A run that writes no sample always fails")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="memory budget of one decode, in pixel values: a DICOM frame or image page "
                        "(rows x columns x samples), a whole NIfTI volume (voxels); with --volumes also a "
                        "whole series and the volume resampled to --spacing; values over 16 "
                        "bits count once per 16 bits. Larger files are quarantined as too_large "
                        f"from their header, before decoding. Default {DEFAULT_MAX_PIXELS} keeps a "
                        "2-D worker under 1 GB (a --volumes worker, with torch and MONAI, "
                        "about 2 GB)")
    p.add_argument("--allow-burned-in", action="store_true",
                   help="keep images flagged BurnedInAnnotation=YES and secondary captures "
                        "(check their pixels for names first)")
    p.add_argument("--volumes", action="store_true",
                   help="one sample per 3-D volume (vol.npy.gz, RAS): each DICOM series "
                        "(grouped by SeriesInstanceUID, sorted by slice position; gapped, uneven "
                        "or mixed series quarantined) and each NIfTI volume, resampled to "
                        "--spacing")
    p.add_argument("--spacing", metavar="X,Y,Z", default=None,
                   help="with --volumes: voxel size in mm after resampling (bilinear, MONAI "
                        "Spacing), or 'native' to keep each volume's own; default 1.5,1.5,2.0")
    p.add_argument("--axis", choices=["axial", "coronal", "sagittal"], default="axial",
                   help="anatomical plane NIfTI volumes are cut along (default axial)")


def run(args: argparse.Namespace) -> int:
    from medssl.data.shard import shard_command

    return shard_command(args)
