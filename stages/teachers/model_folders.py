"""Where a teacher's files are: a timm model folder (``local-dir:PATH``), a hub repo's snapshot in the local hub cache
(``hf-hub:REPO``), and whether the hub can be reached at all.

Offline, timm would retry the hub for most of a minute before failing; these answer at once, from the hub cache,
or say in one line what is missing and the switch that does without it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import timm

from storage import UserError


FOLDER_SOURCES = ("local-dir", "hf-hub", "hf_hub")  # timm's model sources (hf_hub: its older spelling)
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # what timm reads from a hub repo, in its order


def model_folder(name: str, weights: bool = True) -> Path | None:
    """The local folder of a ``local-dir:PATH`` or ``hf-hub:REPO[@REVISION]`` teacher; None for any other name.

    A hub repo's folder is its snapshot in the hub cache, downloaded when the hub can be reached (``weights``:
    its weights file too, else config.json alone); offline, the cached snapshot, or one line saying what is missing.
    """
    source, sep, ident = name.partition(":")
    if not sep or source not in FOLDER_SOURCES:
        return None
    if not ident:
        raise UserError(
            f"teacher '{name}' names no folder: pass local-dir:PATH (a timm model folder, as `pipeline train` writes) or hf-hub:REPO"
        )
    if source == "local-dir":
        folder = Path(ident).expanduser()
        if not folder.is_dir():
            raise UserError(
                f"teacher '{name}': {folder} is not a folder; local-dir: takes a timm model folder (config.json and weights, as `pipeline train` writes)"
            )
        return folder
    from timm.models._hub import hf_split

    repo, revision = hf_split(ident)
    online = hub_reachable()
    wanted = [("config.json",)] + ([HUB_WEIGHTS] if weights else [])
    found = []
    for choices in wanted:  # config.json, then the first weights file the repo has
        found.append(next((path for f in choices if (path := _hub_file(name, repo, revision, f, online))), None))
        if found[-1] is None:
            where = (
                "which the hub does not hold"
                if online
                else "which are not in the local hub cache, and the hub cannot be reached"
            )
            raise UserError(
                f"teacher '{name}' needs {' or '.join(choices)} of hub repo {repo}, {where}: "
                "download the repo elsewhere and pass its folder as --teacher local-dir:FOLDER"
            )
    return Path(found[0]).parent  # the revision's snapshot folder, which holds every file of it


def _hub_file(name: str, repo: str, revision: str | None, filename: str, online: bool) -> str | None:
    """A hub repo's file in the local hub cache: fetched (or refreshed) when ``online``, else the cached copy; None when there is none."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    if not online:
        found = try_to_load_from_cache(repo, filename, revision=revision)
        return found if isinstance(found, str) else None
    try:
        return hf_hub_download(repo, filename, revision=revision)
    except EntryNotFoundError:
        return None
    except (HfHubHTTPError, OSError) as e:  # no such repo or revision, a gated repo, a failed download
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(
            f"teacher '{name}': cannot fetch {filename} of hub repo {repo} ({type(e).__name__}: {first})"
        ) from None


def weights_in_folder(folder: Path) -> Path:
    """The weights file timm loads from a model folder (``timm.models._hub.load_state_dict_from_path``'s choice)."""
    from timm.models._hub import _EXT_PRIORITY, _PREFERRED_FILES

    for candidate in [folder / f for f in _PREFERRED_FILES] + [
        f for ext in _EXT_PRIORITY for f in sorted(folder.glob(f"*{ext}"))
    ]:
        if candidate.is_file():
            return candidate
    raise UserError(
        f"model folder {folder} holds no weights file ({', '.join(_EXT_PRIORITY)}): it needs one beside config.json"
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):  # the hub's own switch
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_weights_reachable(timm_name: str) -> bool:
    """Whether timm's pretrained weights of ``timm_name`` can be had now: in the hub cache, or from the hub (quickly checked)."""
    return cached_hub_file(timm_name) is not None or hub_reachable()


def cached_hub_file(timm_name: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(timm_name)
    repo = getattr(cfg, "hf_hub_id", None)
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = repo and try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return found
    return None
