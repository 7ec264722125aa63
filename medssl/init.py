"""The init contract: where a backbone's starting weights come from, parsed once.

Written ``ssl:DIR`` (a ``medssl publish`` dir), ``imagenet`` or ``random`` in configs and in
results files; every module that needs to know which it is takes an ``Init``, never the string,
so ``"ssl:"`` is spelled in this file only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from medssl.errors import ConfigError

SSL_PREFIX = "ssl:"
KINDS = ("ssl", "imagenet", "random")


@dataclass(frozen=True)
class Init:
    """``kind`` is ssl | imagenet | random; ``path`` is the published dir of an ssl init."""

    kind: Literal["ssl", "imagenet", "random"]
    path: Path | None = None

    @classmethod
    def parse(cls, text: str | Init) -> Init:
        """``"ssl:DIR"`` | ``"imagenet"`` | ``"random"`` -> Init; ConfigError for anything else."""
        if isinstance(text, Init):
            return text
        value = str(text).strip()
        if value in ("imagenet", "random"):
            return cls(value)  # type: ignore[arg-type]
        if value.startswith(SSL_PREFIX) and len(value) > len(SSL_PREFIX):
            return cls("ssl", Path(value[len(SSL_PREFIX):]).expanduser())
        raise ConfigError(f"init {value!r} must be ssl:DIR (a `medssl publish` dir), imagenet or random")

    @property
    def is_ssl(self) -> bool:
        return self.kind == "ssl"

    @property
    def label(self) -> str:
        """Short display name: ``ssl:<dir name>``, ``imagenet`` or ``random``."""
        return f"{SSL_PREFIX}{self.path.name}" if self.path is not None else self.kind

    def __str__(self) -> str:
        """The config spelling, which ``parse`` reads back."""
        return f"{SSL_PREFIX}{self.path}" if self.path is not None else self.kind


def reference(inits: list[str | Init]) -> Init | None:
    """The init a benchmark compares the others with: the first ssl one, if any."""
    return next((i for i in map(Init.parse, inits) if i.is_ssl), None)
