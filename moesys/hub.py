"""Model arguments that name a Hugging Face hub repository (`org/name`) instead of a directory.

`resolve_model_dir(arg)` returns `arg` when it is a directory; when it is not, and it looks like a
hub id, the snapshot directory of that repository in huggingface_hub's cache (`HF_HUB_CACHE`,
`HF_HOME`). With `HF_HUB_OFFLINE=1` only the local cache is read; otherwise huggingface_hub fetches
what the cache lacks (safetensors, JSON and tokenizer files only: moesys never reads pickles) and
falls back to the cache when the hub cannot be reached. Used by `moesys upcycle`, `moesys generate`
and `model.init_from`.
"""

from __future__ import annotations

import re
from pathlib import Path

# org/name as the hub spells repository ids: letters, digits, '-', '_', '.'; no '..' or leading '.'
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
# Enough to build, load and tokenize a model; weights as safetensors only.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def looks_like_hub_id(arg: str) -> bool:
    return _HUB_ID.fullmatch(arg) is not None and ".." not in arg


def resolve_model_dir(arg: str | Path, *, what: str = "model", revision: str | None = None) -> Path:
    """The directory `arg` names: itself, or the cached snapshot of hub repository `arg`.

    Raises ValueError naming `arg` when it is neither a directory nor an available hub repository."""
    path = Path(arg)
    if path.is_dir():
        return path
    text = str(arg)
    if path.exists():
        raise ValueError(f"{what} {text!r} is a file; pass a checkpoint directory (config.json, *.safetensors)")
    if not looks_like_hub_id(text):
        raise ValueError(f"{what} {text!r} is not a directory, nor a hub id like 'org/name'; pass a checkpoint "
                         "directory (config.json, *.safetensors)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    offline = constants.is_offline_mode()
    try:
        return Path(snapshot_download(text, revision=revision, local_files_only=offline,
                                      allow_patterns=ALLOW_PATTERNS))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        how = ("HF_HUB_OFFLINE is set, so only the local cache is read" if offline else
               "and the hub could not be reached")
        raise ValueError(f"{what} {text!r} is not a directory and not in the Hugging Face cache "
                         f"({constants.HF_HUB_CACHE}); {how}. Download it first (`hf download {text}`) or "
                         f"pass a local directory") from e
    except HfHubHTTPError as e:         # not found, gated, private: the hub's own message says which
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{what} {text!r} is not a directory, and the hub refused it: {first}") from e
