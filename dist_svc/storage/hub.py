"""Hugging Face Hub models: `hf://org/name[@revision]`, or a bare `org/name[@revision]` that is
not a local path, resolved to a snapshot in the Hub's local cache through `huggingface_hub`.

The cache comes first: a model whose snapshot is complete is not downloaded again. Online, the
revision (a branch, tag or commit; default `main`) is resolved to its commit, and only the
safetensors weights and the side files (config, tokenizer, adapter config) are downloaded, with
progress bars; legacy `.bin` weights only when the repository has no safetensors. Offline
(`HF_HUB_OFFLINE=1`), the revision is resolved from the cache's `refs/`. The resolved commit is
part of the input's identity, so a branch that moved is a changed input (a half-finished merge
refuses it), and every worker opens the commit the plan resolved (`pin`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

from dist_svc.errors import DistSvcError
from dist_svc.storage.types import SIDE_FILES

PREFIX = "hf://"
# org/name with an optional @revision; the Hub allows letters, digits, '-', '_' and '.' in names.
_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<rev>[^\s@]+))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
WEIGHTS = ["*.safetensors", "*.safetensors.index.json"]
LEGACY = ["*.bin", "*.bin.index.json", "*.pt", "*.pth"]
SIDE = [*SIDE_FILES, "adapter_config.json", "*.json"]


def is_hub_id(text: str) -> bool:
    """`hf://...`, or `org/name[@rev]` when no such local path exists (a local directory wins)."""
    if text.startswith(PREFIX):
        return True
    return bool(_ID.fullmatch(text)) and not Path(text).expanduser().exists()


def canonical(text: str) -> str:
    return text if text.startswith(PREFIX) else PREFIX + text


def parse(spec: str) -> tuple[str, str | None]:
    match = _ID.fullmatch(spec.removeprefix(PREFIX))
    if not match:
        raise DistSvcError(f"{spec}: not a Hugging Face Hub model ID (expected hf://org/name or org/name, "
                           f"optionally @revision).")
    return match["repo"], match["rev"]


def cache_dir() -> Path:
    """The Hub cache, as huggingface_hub finds it (read at every call: tests and users set it late)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve(spec: str, pins: Mapping[str, str] | None = None) -> tuple[Path, dict]:
    """The local snapshot directory of a Hub model, downloading what the cache lacks (online),
    and its identity {hub, revision, commit}. A commit in `pins` (see `pins`) overrides the
    revision: workers read what the plan resolved, even if the branch moved since."""
    repo, revision = parse(spec)
    pin = (pins or {}).get(f"{repo}@{revision or 'main'}")
    try:
        import huggingface_hub
        from huggingface_hub.errors import (
            GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
        )
    except ImportError:
        raise DistSvcError(f"{spec}: reading Hugging Face Hub models needs huggingface_hub: "
                           f"pip install 'dist-svc[hub]'.") from None
    asked = pin or revision or "main"
    cache = cache_dir()
    where = f"{PREFIX}{repo}@{asked}"

    def download(patterns: list[str]) -> Path:
        return Path(huggingface_hub.snapshot_download(
            repo, revision=asked, cache_dir=str(cache), allow_patterns=patterns, ignore_patterns=["*/*"],
            local_files_only=offline()))

    try:
        folder = download(WEIGHTS + SIDE)
        if not offline() and not any(p.suffix == ".safetensors" for p in folder.iterdir()):
            folder = download(LEGACY + SIDE)  # an older repository: .bin weights only
    except (LocalEntryNotFoundError, FileNotFoundError) as e:
        if type(e).__name__ == "IncompleteSnapshotError":
            raise DistSvcError(f"{where}: only part of it is in the Hugging Face cache at {cache} "
                               f"({str(e)[:300]}).") from None
        state = "HF_HUB_OFFLINE is set" if offline() else f"the Hub could not be reached ({type(e).__name__})"
        raise DistSvcError(
            f"{where}: not in the Hugging Face cache at {cache} and {state}. Download it where the Hub is "
            f"reachable (`hf download {repo}{f' --revision {asked}' if asked != 'main' else ''}`, or a dist-svc run "
            f"without HF_HUB_OFFLINE), or point HF_HUB_CACHE at a cache that holds it.") from None
    except RevisionNotFoundError:
        raise DistSvcError(f"{where}: the repository has no revision '{asked}' (a branch, tag or commit).") from None
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise DistSvcError(f"{where}: the Hub refuses it ({type(e).__name__}): the repository does not exist, or "
                           f"it is private or gated and this machine's token (HF_TOKEN, `hf auth login`) may not "
                           f"read it.") from None
    except HfHubHTTPError as e:
        raise DistSvcError(f"{where}: the Hub answered with an error ({str(e).splitlines()[0][:200]}).") from None
    except OSError as e:
        raise DistSvcError(f"{where}: cannot download into the Hugging Face cache at {cache}: "
                           f"{e.strerror or e}.") from None
    commit = folder.name
    if not _COMMIT.fullmatch(commit):
        raise DistSvcError(f"{where}: the cache returned {folder}, which is not a snapshot of a commit.")
    return folder, {"hub": repo, "revision": revision or "main", "commit": commit}


def pins(identity) -> dict[str, str]:
    """repo@revision -> commit of every Hub model in a plan's input identities."""
    found: dict[str, str] = {}
    if isinstance(identity, dict):
        if {"hub", "revision", "commit"} <= set(identity):
            found[f"{identity['hub']}@{identity['revision']}"] = identity["commit"]
        for value in identity.values():
            found.update(pins(value))
    elif isinstance(identity, list):
        for value in identity:
            found.update(pins(value))
    return found
