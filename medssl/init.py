"""The init contract: where a backbone's starting weights come from, parsed once.

Written ``ssl:DIR`` (a ``medssl publish`` dir, 2-D or 3-D), ``imagenet``, ``random`` or
``monai-ssl:FILE`` (MONAI's self-supervised Swin UNETR encoder weights, the released
``model_swinvit.pt`` layout: 3-D ``monai:SwinUNETR`` only; loaded by
``medssl.volume_models``) in configs and in results files; every module that needs to know
which it is takes an ``Init``, never the string, so the prefixes are spelled in this file only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from medssl.errors import ConfigError

SSL_PREFIX = "ssl:"
MONAI_SSL_PREFIX = "monai-ssl:"
KINDS = ("ssl", "imagenet", "random", "monai-ssl")
_PREFIXES = {"ssl": SSL_PREFIX, "monai-ssl": MONAI_SSL_PREFIX}


@dataclass(frozen=True)
class Init:
    """``kind`` is ssl | imagenet | random | monai-ssl; ``path`` is the published dir of an ssl
    init, or the weights file of a monai-ssl one."""

    kind: Literal["ssl", "imagenet", "random", "monai-ssl"]
    path: Path | None = None

    @classmethod
    def parse(cls, text: str | Init) -> Init:
        """``"ssl:DIR"`` | ``"imagenet"`` | ``"random"`` | ``"monai-ssl:FILE"`` -> Init;
        ConfigError for anything else."""
        if isinstance(text, Init):
            return text
        value = str(text).strip()
        if value in ("imagenet", "random"):
            return cls(value)  # type: ignore[arg-type]
        # monai-ssl: first: "ssl:" is not its prefix, but keep the longer spelling first anyway.
        for kind in ("monai-ssl", "ssl"):
            prefix = _PREFIXES[kind]
            if value.startswith(prefix) and len(value) > len(prefix):
                return cls(kind, Path(value[len(prefix):]).expanduser())  # type: ignore[arg-type]
        raise ConfigError(f"init {value!r} must be ssl:DIR (a `medssl publish` dir), imagenet, random "
                          "or monai-ssl:FILE (MONAI's Swin UNETR SSL weights, 3-D only)")

    @property
    def is_ssl(self) -> bool:
        """A medssl published dir (the weights a benchmark is about)."""
        return self.kind == "ssl"

    @property
    def is_monai_ssl(self) -> bool:
        return self.kind == "monai-ssl"

    @property
    def label(self) -> str:
        """Short display name: ``ssl:<dir name>``, ``monai-ssl:<file name>``, ``imagenet`` or
        ``random``."""
        return f"{_PREFIXES[self.kind]}{self.path.name}" if self.path is not None else self.kind

    def __str__(self) -> str:
        """The config spelling, which ``parse`` reads back."""
        return f"{_PREFIXES[self.kind]}{self.path}" if self.path is not None else self.kind


def reference(inits: list[str | Init]) -> Init | None:
    """The init a benchmark compares the others with: the first ssl one, if any."""
    return next((i for i in map(Init.parse, inits) if i.is_ssl), None)
