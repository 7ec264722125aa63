"""The Hugging Face Hub, as medssl uses it: is it allowed, is it reachable, where is its cache,
and the upload of a published dir. Everything that touches the network goes through here, so
``HF_HUB_OFFLINE`` and an unreachable host are handled once, fast, without hanging.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from pathlib import Path

from medssl.errors import MedsslError

log = logging.getLogger(__name__)

_HUB_HOST = ("huggingface.co", 443)


def check_push_possible(repo: str) -> None:
    """Refuse a --push-to-hub that cannot work, before any work: bad repo id, offline, no
    token, Hub unreachable."""
    from huggingface_hub import get_token

    if not re.fullmatch(r"[\w.-]+/[\w.-]+|[\w.-]+", repo):
        raise MedsslError(f"--push-to-hub {repo!r}: not a repo id like 'org/name'")
    if hub_offline():
        raise MedsslError("--push-to-hub: HF_HUB_OFFLINE is set; unset it or publish locally only")
    if get_token() is None:
        raise MedsslError("--push-to-hub: no Hugging Face token; run `hf auth login` or set HF_TOKEN")
    if not hub_online():
        raise MedsslError("--push-to-hub: huggingface.co is not reachable from this machine; "
                          "publish locally and push from a machine with network access")


def push(out: Path, repo: str, files: tuple[str, ...]) -> None:
    """Upload ``files`` of ``out`` to the model repo ``repo`` (created if absent)."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=url.repo_id, folder_path=str(out), allow_patterns=list(files),
                          commit_message="medssl publish")
    except Exception as exc:  # HTTP, auth, network: one line; the local publish is complete
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MedsslError(f"--push-to-hub {repo}: upload failed ({first}); the published dir "
                          f"{out} is complete, push it later") from exc
    log.info("pushed %s to https://huggingface.co/%s", out, url.repo_id)


def hub_offline() -> bool:
    """True when the user asks for no Hub access (``HF_HUB_OFFLINE`` in the environment now).

    The environment is read at each call, not huggingface_hub's ``constants.HF_HUB_OFFLINE``,
    which is a snapshot taken when it was first imported: a process (or a test) that changes
    the variable afterwards must be obeyed as it is now.
    """
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_online(timeout_s: float = 3.0) -> bool:
    """True if the Hub is allowed and reachable within ``timeout_s`` (DNS included)."""
    if hub_offline():
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection(_HUB_HOST, timeout=timeout_s).close()
            result.append(True)
        except OSError:
            result.append(False)

    # getaddrinfo ignores socket timeouts; a daemon thread bounds a hanging DNS lookup too.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    return bool(result and result[0])


def hub_cache_dir() -> str:
    """The Hugging Face hub cache folder (``HF_HUB_CACHE``, else ``HF_HOME``/hub, else default)."""
    # Read the environment now, as for HF_HUB_OFFLINE: huggingface_hub fixed it at import.
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE
