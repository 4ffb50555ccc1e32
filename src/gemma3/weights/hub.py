"""Hugging Face Hub ids (``google/gemma-3-270m``) -> a local snapshot directory.

`huggingface_hub` is an optional extra (``pip install 'gemma3[hub]'``) and is imported only here, only
when a hub id is actually used. Downloads go through its cache and honour its usual environment
(HF_HOME, HF_TOKEN, HF_HUB_OFFLINE ...); only what a text model needs is fetched, never pickles.
"""

from __future__ import annotations

import re
from pathlib import Path

from gemma3.errors import CheckpointError

# What a Gemma 3 text checkpoint needs. No *.bin / *.pt / *.pth: those are pickles (docs/security.md).
ALLOW_PATTERNS = [
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "model-*.safetensors", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json",
]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(source: str) -> bool:
    """``owner/name`` with nothing that would only make sense as a path (``./``, ``..``, a suffix)."""
    return bool(_HUB_ID.match(source)) and ".." not in source and not source.endswith((".gguf", ".json"))


def download(repo_id: str, revision: str | None = None) -> Path:
    """Fetch (or find in the cache) the files of `repo_id` that a text model needs; return the directory."""
    try:
        import huggingface_hub
        from huggingface_hub.utils import HfHubHTTPError
    except ImportError:
        raise CheckpointError(f"{repo_id}: loading from the Hugging Face Hub needs huggingface_hub: "
                              "pip install 'gemma3[hub]'") from None
    hint = "the Hugging Face Hub cannot be reached; download the model and pass its local directory or .gguf path"
    try:
        path = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS)
    except huggingface_hub.errors.GatedRepoError:
        raise CheckpointError(f"{repo_id}: this model is gated; accept its licence on huggingface.co and "
                              "log in (hf auth login) or set HF_TOKEN") from None
    except huggingface_hub.errors.RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id}: no such model on the Hugging Face Hub (or it is private: set "
                              "HF_TOKEN), and no such local file or directory") from None
    except huggingface_hub.errors.LocalEntryNotFoundError:
        raise CheckpointError(f"{repo_id}: not in the local Hugging Face cache and {hint}") from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"{repo_id}: {hint} ({type(e).__name__})") from None
    return Path(path)
