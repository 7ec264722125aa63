"""The 3-D parts of the model card: what a ``monai:<Net>`` backbone is and how to load it.

medssl/card.py builds every card; for 3-D weights it takes the description, the input rows of
the training table and the loading section from here, and keeps every other section
(provenance, de-identification, results, intended use, limitations, "not for clinical use").
The strings come from the run record (network name, kwargs, voxel counts, spacing), never from
a source file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class VolumeCard:
    """What a card says about 3-D weights (medssl/publish_volume.py fills it)."""

    net: str                                   # monai.networks.nets.<net>
    kwargs: dict[str, Any] = field(default_factory=dict)   # its complete constructor kwargs
    cube: tuple[int, int, int] = (96, 96, 96)  # network input, voxels (X, Y, Z)
    spacing: list[float] | None = None         # mm per voxel the shards were resampled to


def cube_words(volume: VolumeCard) -> str:
    return "×".join(str(int(v)) for v in volume.cube)


def spacing_words(volume: VolumeCard) -> str:
    if not volume.spacing:
        return "voxel size not recorded"
    return "×".join(f"{float(v):g}" for v in volume.spacing) + " mm voxels"


def description(arch: str, method: str, modality: str | None, in_chans: int, window: str,
                mean: list[float], std: list[float], volume: VolumeCard) -> str:
    return (
        "## Model description\n\n"
        f"A **3-D** `{arch}` backbone (MONAI `monai.networks.nets.{volume.net}`, pooled features "
        f"only) pretrained with {method} on unlabeled {modality or 'medical'} volumes with medssl. "
        f"It takes {in_chans}-channel {cube_words(volume)} voxel cubes (axes RAS, "
        f"{spacing_words(volume)}): {window}, scaled to [0, 1], then normalised with mean {mean} "
        f"and std {std} (also in `config.json` → `input`).\n"
    )


def training_rows(volume: VolumeCard) -> list[tuple[str, Any]]:
    return [("spatial dims", 3), ("input size (voxels)", cube_words(volume)),
            ("voxel size", spacing_words(volume)), ("MONAI network", volume.net)]


def how_to_load(in_chans: int, volume: VolumeCard) -> str:
    snippet = (
        "import json\n\n"
        "import monai.networks.nets\n"
        "from safetensors.torch import load_file\n\n"
        "config = json.load(open(\"config.json\"))\n"
        "net = getattr(monai.networks.nets, config[\"monai\"][\"net\"])(**config[\"monai\"][\"kwargs\"])\n"
        "net.load_state_dict(load_file(\"model.safetensors\"))  # strict: every tensor\n"
    )
    kwargs = json.dumps(volume.kwargs, sort_keys=True)
    return (
        "## How to load\n\n"
        f"With plain MONAI: `config.json` names the network (`{volume.net}`) and its complete "
        f"arguments (`{kwargs}`, {in_chans} input channel(s)); check `SHA256SUMS` first "
        "(`sha256sum -c SHA256SUMS`).\n\n```python\n" + snippet + "```\n\n"
        f"The input is a `[B, {in_chans}, {', '.join(str(v) for v in volume.cube)}]` tensor. "
        "These are 3-D weights: timm's `local-dir:` / `hf-hub:` loading does not apply to them. "
        "In medssl, `medssl finetune` takes the folder as `ssl:DIR` with a `monai:` model.arch.\n"
    )
