"""What a reader says about a file it will not use, and the quiet it keeps while reading.

``Quarantine`` is the one exception a reader raises for a file it will not turn into samples;
``muted_loggers`` keeps decoders from logging what a header holds. Both live apart from the
dispatcher (``readers.py``) so that the format readers it dispatches to need not import it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


class Quarantine(Exception):
    """A file the readers will not turn into samples, with a short snake_case ``reason``.

    Reasons in use: ``unreadable``, ``truncated``, ``unsupported_format``,
    ``unsupported_transfer_syntax``, ``undecodable``, ``unsupported_dimensions``,
    ``burned_in_annotation``, ``secondary_capture``, ``ultrasound_burned_in``,
    ``not_an_image``, ``no_pixel_data``, ``empty_volume``, ``too_large``, ``bad_mask``
    (``masks``: a recipe's finding mask that cannot be read or does not fit its image).
    """

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message = message or reason

    def __reduce__(self):
        # Survive the trip back from a worker process with reason and message intact.
        return (type(self), (self.reason, self.message))


_MUTED = logging.CRITICAL + 1


@contextmanager
def muted_loggers(*names: str) -> Iterator[None]:
    """Silence the named library loggers and their children for the duration.

    Decoders log header and chunk *values* (pydicom quotes invalid names and dates at
    WARNING, Pillow prints EXIF/tEXt values at DEBUG); nothing from a file may reach a log.
    Readers hold this only around synchronous library calls, never across a ``yield``.
    """
    # Loggers already muted (by an enclosing call) are left alone: ``setLevel`` clears the
    # level cache of every logger in the process, and with torch and MONAI imported (thousands
    # of loggers) that cost 2 ms a call -- a quarter of a volume's read time, measured.
    loggers = [lg for lg in map(logging.getLogger, names) if lg.level != _MUTED]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(_MUTED)  # children left at NOTSET inherit this
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved):
            lg.setLevel(level)
