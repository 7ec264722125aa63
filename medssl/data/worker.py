"""The worker side of ``medssl shard``: one input file -> de-identified, encoded samples.

``process_input`` reads a file (``readers.read_slices``, under the ``--max-pixels`` budget),
de-identifies and PNG-encodes each slice; ``iter_results`` runs it on ``--workers``
processes and hands the results back *in input order*, with a bounded window of tasks in
flight (memory stays flat however large the corpus).

Workers are started with ``spawn``: a fresh interpreter that imports only this module and
the readers (numpy, pydicom, nibabel, Pillow), not the parent's torch, pulled in by
WebDataset for the tar writer. A forked worker starts with the parent's ~500 MB resident
and drifts towards a private copy of it as reference counts touch the shared pages; a
spawned one starts near 60 MB, so ``--max-pixels`` is what its peak depends on. The price is
about half a second per run to start the workers (benchmarks/ingest.py: 400 CT slices on two
workers, 3.4 s against 2.9 s forked; the same CPU per slice). A ``--volumes`` worker imports
torch and MONAI as well, for the resampling (``volumes``: ~0.9 GB resident, ~5 s to import),
and holds one volume at a time: its window is one task per worker.
"""

from __future__ import annotations

import json
import multiprocessing
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medssl.data import sample as sample_mod
from medssl.data.splits import assign_split
from medssl.errors import MedsslError

#: Modality default display windows (center, width) in modality units, used when a slice has none.
DEFAULT_WINDOWS = {"CT": (40.0, 400.0)}
_FILES_PER_TASK = 4       # amortises inter-process overhead for one-slice DICOM files
_TASKS_PER_WORKER = 2     # in-flight tasks per worker: keeps workers busy, bounds memory
_VOLUME_SUFFIXES = (".nii", ".nii.gz")  # hundreds of slices each: one file per task
#: Reasons of the volume reader whose message is ours (numbers, no header text): reported.
_VOLUME_DETAILS = ("multiframe", "not_grayscale", "mixed_dimensions", "empty_volume")


@dataclass(frozen=True)
class InputItem:
    """One input file and what a recipe says about it (None when there is no manifest)."""

    index: int
    path: str                       # as discovered: goes to the report only
    patient_id: str | None = None
    label: int | list[int] | None = None
    split: str | None = None
    slice: int | None = None        # keep only this slice of a volume (recipe slice_column)
    mask: str | None = None         # recipe masks: its mask file, '' none; None: not asked
    quarantine: str | None = None   # known before reading: a recipe row, a discovery problem
    attributes: tuple[tuple[str, str], ...] = ()   # recipe columns, coarsened (name, value)
    files: tuple[str, ...] = ()     # --volumes: a DICOM series' slice files, sorted along z
    geometry: tuple[float, ...] = ()  # --volumes: that series' 4x4 voxel -> LPS mm affine
    detail: str | None = None       # why ``quarantine`` (our words and numbers): report only

    @property
    def identity(self) -> str:
        """The absolute path: keys and the inputs digest must not depend on the cwd."""
        from medssl.data.readers import identity

        return identity(self.path)


@dataclass(frozen=True)
class Job:
    """Settings every worker needs; picklable."""

    salt: bytes
    fractions: dict
    axis: str
    allow_burned_in: bool
    max_side: int
    max_pixels: int
    header_attributes: tuple[str, ...] = ()   # read from DICOM headers (attributes module)
    recorded: tuple[str, ...] = ()            # every attribute the run records (for counts)
    volumes: bool = False                     # --volumes: one sample per volume (volumes.py)
    spacing: tuple[float, float, float] | None = None   # --spacing, mm; None: native


@dataclass
class Encoded:
    """One sample, ready for the tar: member bytes plus routing information."""

    key: str
    png: bytes                      # the image member's bytes (``member``), PNG or vol.npy.gz
    meta: bytes
    cls: bytes | None
    split: str
    patient: str
    mask: np.ndarray | None = None  # bool [H, W] finding mask (--masks-out); never in a shard
    attributes: dict[str, str | None] = field(default_factory=dict)  # recorded name -> value
    member: str = "img.png"         # sample.VOLUME_MEMBER for a volume


@dataclass
class InputResult:
    """The outcome of one input file: its samples (all or none) or its quarantine reason."""

    index: int
    outcome: str                    # "written" | "quarantined"
    reason: str | None = None
    detail: str | None = None       # exception class of an unexpected error; report only
    samples: list[Encoded] = field(default_factory=list)
    modality: str | None = None
    skipped: dict[str, list[int]] = field(default_factory=dict)  # reason -> slice numbers


# ---------------------------------------------------------------- worker side

_PSEUDO_CACHE: dict[bytes, object] = {}


def _pseudonymizer(salt: bytes):
    from medssl.data import deid

    if salt not in _PSEUDO_CACHE:
        _PSEUDO_CACHE[salt] = deid.Pseudonymizer(salt)
    return _PSEUDO_CACHE[salt]


def default_window(pixels: np.ndarray, modality: str | None) -> tuple[float, float]:
    """(center, width) for a ``[H, W]`` slice with no stored window: modality default, else
    the 0.5/99.5 percentiles of its values."""
    if modality in DEFAULT_WINDOWS:
        return DEFAULT_WINDOWS[modality]
    if pixels.dtype.kind == "f":  # NaN/inf voxels are stored as the minimum; ignore them here
        pixels = pixels[np.isfinite(pixels)]
    lo, hi = np.percentile(pixels, [0.5, 99.5])
    return float((lo + hi) / 2.0), float(max(hi - lo, 1e-6))


def encode_slice(sl: sample_mod.Slice, pseudo, item: InputItem, slice_no: int, job: Job) -> Encoded:
    """De-identify and encode one slice (the hot path: one PNG encode per slice)."""
    from medssl.data import deid

    # A recipe's patient column and label win over what the file's header says.
    if item.patient_id is not None:
        sl.patient_id = item.patient_id
    if item.label is not None:
        sl.label = item.label
    if job.recorded:
        _set_attributes(sl, item, job, pseudo)
    if sl.pixels.ndim == 2 or sl.is_volume:
        stored, offset, slope = sample_mod.encode_intensity(sl.pixels)
        intensity = {"offset": offset, "slope": slope}
        if sl.window is None:
            sl.window = default_window(sl.pixels, sl.modality)
    else:
        stored = np.ascontiguousarray(sl.pixels, dtype=np.uint8)
        intensity = None
    meta = deid.sample_metadata(sl, pseudo, intensity=intensity)
    patient = meta["patient"]
    split = assign_split(patient, job.fractions, item.split)
    unknown = set(meta) - set(sample_mod.SAMPLE_META_KEYS)
    if unknown:  # a bug in the allow-list, not user error: refuse rather than leak
        raise RuntimeError(f"sample metadata outside SAMPLE_META_KEYS: {sorted(unknown)}")
    label = meta.get("label")
    cls = str(label).encode("ascii") if isinstance(label, int) else None
    key = pseudo.sample_key(patient, item.identity, slice_no)
    if sl.is_volume:
        png, member = sample_mod.encode_volume(stored), sample_mod.VOLUME_MEMBER
    else:
        png, member = sample_mod.encode_png(stored), "img.png"
    stored_attrs = meta.get("attributes") or {}
    counted = {n: meta.get("view") if n == "view" else stored_attrs.get(n) for n in job.recorded}
    return Encoded(key=key, png=png,
                   meta=json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8"),
                   cls=cls, split=split, patient=patient, attributes=counted, member=member)


def _set_attributes(sl: sample_mod.Slice, item: InputItem, job: Job, pseudo) -> None:
    """Header attributes (only those asked for), then the recipe's columns over them; the view
    goes to the contract's top-level field. The raw header strings stay in ``sl.extra``."""
    from medssl.data.attributes import header_attributes

    found = {}
    if job.header_attributes:
        found = header_attributes(sl.extra.get("header") or {}, job.header_attributes, pseudo)
    found.update(dict(item.attributes))
    view = found.pop("view", None)
    if view is not None:
        sl.view = view
    sl.attributes = found


def _non_finite(pixels: np.ndarray) -> bool:
    """A grayscale float slice with no finite value: nothing to store (all NaN or inf)."""
    return pixels.dtype.kind == "f" and pixels.ndim == 2 and not np.isfinite(pixels).any()


def process_input(item: InputItem, job: Job) -> InputResult:
    """Read one file to samples; a file is written whole or quarantined whole, except that
    a slice with no finite value is skipped (and reported) instead of losing the file."""
    if item.quarantine:
        return InputResult(item.index, "quarantined", reason=item.quarantine, detail=item.detail)
    # Numeric edge cases in a scan (NaN, overflow in a header's scale) must not print
    # numpy warnings: outcomes are judged and reported per file, never on stderr.
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return _process(item, job)


def _process(item: InputItem, job: Job) -> InputResult:
    from medssl.data import readers

    pseudo = _pseudonymizer(job.salt)
    samples: list[Encoded] = []
    skipped: dict[str, list[int]] = {}
    modality = None
    try:
        if job.volumes:
            from medssl.data.volumes import read_volumes

            slices = read_volumes(item, job)
        else:
            slices = readers.read_slices(Path(item.path), axis=job.axis,
                                         allow_burned_in=job.allow_burned_in,
                                         max_side=job.max_side, max_pixels=job.max_pixels)
        for slice_no, sl in enumerate(slices):
            if item.slice is not None and slice_no != item.slice:
                if slice_no > item.slice:
                    break
                continue
            if _non_finite(sl.pixels):
                skipped.setdefault("non_finite_slice", []).append(slice_no)
                continue
            modality = modality or sl.modality
            samples.append(encode_slice(sl, pseudo, item, slice_no, job))
            if item.mask is not None:
                from medssl.data.masks import sample_mask

                samples[-1].mask = sample_mask(item.mask, sl.pixels.shape[:2], job.max_side,
                                               len(samples))
    except readers.Quarantine as exc:
        # too_large says what the header claimed (numbers only), to help choose --max-pixels;
        # bad_mask what is wrong with the mask (our words and sizes).
        detail = exc.message if exc.reason in ("too_large", "bad_mask") else None
        if job.volumes and exc.reason in _VOLUME_DETAILS:
            detail = exc.message
        return InputResult(item.index, "quarantined", reason=str(exc.reason), detail=detail)
    except MedsslError:
        raise
    except Exception as exc:
        # Class name only, like the readers: exception text can quote header values, and the
        # report must not carry what a scan's header holds.
        return InputResult(item.index, "quarantined", reason="read_error",
                           detail=type(exc).__name__)
    if not samples:
        if skipped:
            reason = next(iter(skipped))
        else:
            reason = "no_images" if item.slice is None else "slice_out_of_range"
        return InputResult(item.index, "quarantined", reason=reason)
    return InputResult(item.index, "written", samples=samples, modality=modality,
                       skipped=skipped)


def _process_chunk(items: list[InputItem], job: Job) -> list[InputResult]:
    return [process_input(item, job) for item in items]


def _chunks(items: list[InputItem], volumes: bool = False) -> Iterator[list[InputItem]]:
    """Consecutive runs of up to ``_FILES_PER_TASK`` files; a volume always travels alone."""
    chunk: list[InputItem] = []
    for item in items:
        volume = volumes or item.path.lower().endswith(_VOLUME_SUFFIXES)
        if chunk and (volume or len(chunk) >= _FILES_PER_TASK):
            yield chunk
            chunk = []
        chunk.append(item)
        if volume:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def iter_results(items: list[InputItem], job: Job, workers: int) -> Iterator[InputResult]:
    """Results in input order, with at most ``workers * _TASKS_PER_WORKER`` tasks in flight
    (``workers`` for ``--volumes``: one volume per worker, the memory bound the issue asks).

    Memory is bounded by that window (a few files' encoded samples per worker), not by the
    corpus: results are consumed first-in first-out, so a slow parent stalls submission.
    """
    chunks = _chunks(items, job.volumes)
    window = workers * (1 if job.volumes else _TASKS_PER_WORKER)
    if workers <= 1:
        for chunk in chunks:
            yield from _process_chunk(chunk, job)
        return
    with ProcessPoolExecutor(max_workers=workers,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        pending: deque = deque()
        try:
            for chunk in chunks:
                pending.append((chunk[0].index, pool.submit(_process_chunk, chunk, job)))
                if len(pending) >= window:
                    yield from _result(*pending.popleft())
            while pending:
                yield from _result(*pending.popleft())
        finally:
            for _, fut in pending:
                fut.cancel()


def _result(first: int, fut) -> list[InputResult]:
    try:
        return fut.result()
    except BrokenProcessPool:
        # A worker killed from outside (the kernel's OOM killer, a signal): one line, and
        # the journal keeps what was finished, so the same command resumes.
        raise MedsslError(f"a shard worker died while reading input #{first} or a neighbour "
                          "(out of memory? lower --max-pixels or --workers); re-run the same "
                          "command to resume") from None
