"""Finding masks joined to shard samples: ``medssl shard ... --masks-out FILE.npz``.

A recipe's ``masks: COLUMN`` names the manifest column holding, per image, the path of its
finding mask (relative like the image path; blank: no finding). The mask is an 8- or 16-bit
grayscale PNG (nonzero inside; ``medssl synth`` writes 0/255 ``*.mask.png``) or a 2-D ``.npy``
on the grid of the decoded image. Workers put it on the stored image's grid (``read_mask``:
the same ``--max-side`` resize as the image, thresholded at half) and hand it back beside the
sample; it never enters a shard.

``--masks-out FILE.npz`` then holds one bool ``[H, W]`` array per written sample, named by its
pseudonymous sample key (the tar's ``__key__``), in input order: exactly what
``evaluation.explain.masks`` reads (``finetune/explain_masks.py``). A sample without a finding
gets an all-zero mask, so it is scored as "no finding" rather than "unknown". The file holds
keys and pixels only, no path and no name. It is written once, at the end of the run (a zip
built by hand with fixed timestamps: same inputs, same bytes); a resumed run re-reads the inputs
the interrupted one had finished, and a finished folder gets the file built on request, so the
file always covers every sample of the shards. Its zip comment marks it as ours, with a salted
digest of the run's settings: an existing FILE without that mark is refused, never overwritten,
and one whose mark matches is left as it is (delete it to rebuild after editing masks).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from medssl.data.quarantine import Quarantine
from medssl.errors import ConfigError, MedsslError

MARKER_PREFIX = b"medssl-shard-masks/v1 "
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_MASK_SUFFIXES = (".png", ".npy")


def _load(path: Path) -> np.ndarray:
    """A 2-D bool mask from a PNG or ``.npy``; Quarantine ``bad_mask`` when it cannot be."""
    name = path.name.lower()
    if not name.endswith(_MASK_SUFFIXES):
        raise Quarantine("bad_mask", "mask is not a .png or .npy file")
    try:
        if name.endswith(".npy"):
            arr = np.load(path, allow_pickle=False)
        else:
            from PIL import Image

            with Image.open(path) as img:
                if img.mode not in ("1", "L", "I;16", "I"):
                    raise Quarantine("bad_mask", f"mask PNG is mode {img.mode}, not grayscale")
                arr = np.asarray(img)
    except Quarantine:
        raise
    except FileNotFoundError:
        raise Quarantine("bad_mask", "mask file not found") from None
    except Exception as exc:  # class name only, like the readers
        raise Quarantine("bad_mask", f"mask unreadable ({type(exc).__name__})") from None
    if arr.ndim != 2:
        raise Quarantine("bad_mask", f"mask is {arr.ndim}-D, not 2-D")
    return arr != 0


def read_mask(path: str | Path, shape: tuple[int, int], max_side: int | None) -> np.ndarray:
    """The mask at ``path`` on the stored image's grid: bool ``[shape]``.

    The image was shrunk by ``readers.read_slices`` iff its longer side exceeded ``max_side``;
    the mask goes through the same resize (bilinear, as float) and is thresholded at 0.5, so it
    covers the same pixels. A mask whose grid does not give ``shape`` is a ``bad_mask``.
    """
    from medssl.data.readers import _resize  # the image's own resize: the same geometry
    from medssl.data.sample import Slice

    mask = _load(Path(path))
    if max_side is not None and max(mask.shape) > max_side:
        plane = _resize(Slice(pixels=mask.astype(np.float32), patient_id="", source=""),
                        max_side).pixels
        mask = plane >= 0.5
    if mask.shape != tuple(shape):
        raise Quarantine("bad_mask", f"mask is {mask.shape[1]} x {mask.shape[0]} px, the image "
                         f"{shape[1]} x {shape[0]}")
    return mask


def sample_mask(mask_path: str, shape: tuple[int, int], max_side: int | None,
                slice_count: int) -> np.ndarray:
    """The mask of the ``slice_count``-th sample of an input (1-based) whose recipe row gives
    ``mask_path`` ('' = no finding: all zeros). A 2-D mask belongs to one image, so a file that
    yields a second slice with a mask is a ``bad_mask`` (use the recipe's slice_column)."""
    if not mask_path:
        return np.zeros(shape, bool)
    if slice_count > 1:
        raise Quarantine("bad_mask", "a 2-D mask for a file of several slices; give slice_column")
    return read_mask(mask_path, shape, max_side)


def masks_marker(salt: bytes, config: dict, mask_paths: list[str | None]) -> bytes:
    """The zip comment of a masks file: our prefix and a salted digest of the run (settings,
    inputs, mask paths), so no path can be read back from it."""
    text = json.dumps([config, mask_paths], sort_keys=True)
    return MARKER_PREFIX + hmac.new(salt, text.encode("utf-8"), hashlib.sha256).hexdigest()[:32].encode()


def check_masks_out(path: Path, shard_folder: Path, marker: bytes) -> bool:
    """Refuse a ``--masks-out`` we must not write; True when it already holds this run's masks.

    Raises ConfigError for a name that is not ``.npz`` or lies inside the shard folder (the
    folder is what gets shared), MedsslError for an existing file that is not ours or is
    another run's.
    """
    if path.suffix.lower() != ".npz":
        raise ConfigError(f"--masks-out {path}: name a .npz file (what evaluation.explain.masks reads)")
    folder, target = shard_folder.resolve(), path.resolve()
    if folder == target or folder in target.parents:
        raise ConfigError(f"--masks-out {path}: is inside the shard folder {shard_folder}; "
                          "write it beside the folder, never into it")
    if not path.exists():
        return False
    if not path.is_file():
        raise MedsslError(f"--masks-out {path}: exists and is not a file; choose another name")
    comment = b""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                comment = zf.comment
    except (OSError, zipfile.BadZipFile):
        comment = b""
    if not comment.startswith(MARKER_PREFIX):
        raise MedsslError(f"--masks-out {path}: exists and was not written by medssl shard; "
                          "choose another name or move it away")
    if comment != marker:
        raise MedsslError(f"--masks-out {path}: holds the masks of another shard run (other "
                          "inputs, masks or settings); choose another name or delete it")
    return True


class MaskWriter:
    """``FILE.npz`` written member by member (memory stays flat), renamed into place by ``close``."""

    def __init__(self, path: Path, marker: bytes) -> None:
        self.path = Path(path)
        self.marker = marker
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._zip = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_DEFLATED)
        self.count = self.with_finding = 0

    def add(self, key: str, mask: np.ndarray) -> None:
        """One sample's bool ``[H, W]`` mask under its sample key."""
        info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_TIME)
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = 0o644 << 16
        with self._zip.open(info, "w") as fh:
            np.lib.format.write_array(fh, np.ascontiguousarray(mask, dtype=bool),
                                      allow_pickle=False)
        self.count += 1
        self.with_finding += bool(mask.any())

    def add_result(self, result) -> None:
        """Every sample of a ``worker.InputResult`` (quarantined inputs have none)."""
        for enc in result.samples:
            if enc.mask is None:  # a bug, not user error: each sample of a masks run has one
                raise RuntimeError(f"sample {enc.key} came back without its mask")
            self.add(enc.key, enc.mask)

    def close(self) -> None:
        self._zip.comment = self.marker
        self._zip.close()
        with open(self.tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.path)


__all__ = ["MARKER_PREFIX", "MaskWriter", "check_masks_out", "masks_marker", "read_mask",
           "sample_mask"]
