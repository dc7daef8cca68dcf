"""The model hub probe: whether hub weights can be had (already cached, or the hub reachable),
so a download that cannot succeed fails at once instead of retrying for a minute."""

from __future__ import annotations

import os


def hub_host() -> str:
    from urllib.parse import urlparse

    return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"


def hub_reachable(timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection((hub_host(), 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def in_hub_cache(name: str) -> bool:
    """Whether timm's hub weights for ``name`` are already in the local Hugging Face cache."""
    import timm

    try:
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.models.get_pretrained_cfg(name)
        repo = getattr(cfg, "hf_hub_id", None)
        return bool(repo) and any(isinstance(try_to_load_from_cache(repo, f), str)
                                  for f in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"))
    except Exception:  # no huggingface_hub, no config: let timm decide
        return False
