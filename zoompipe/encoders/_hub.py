"""Weights from the Hugging Face hub, or from copies of it, failing with the fix spelled out."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ..errors import ZoompipeError

if TYPE_CHECKING:
    from torch import nn


def create_pretrained(arch: str, encoder: str, **kwargs: object) -> nn.Module:
    """``timm.create_model(arch, pretrained=True)``, or a one-line error naming ``--weights``.

    timm falls back to random weights with only a log warning when a model has none
    published, so that case is refused before creating anything.
    """
    import timm
    from timm.models import get_pretrained_cfg

    cfg = None if arch.startswith(("hf-hub:", "hf_hub:", "local-dir:")) else get_pretrained_cfg(arch)
    if cfg is not None and not (cfg.hf_hub_id or cfg.url or cfg.file) or cfg is None and ":" not in arch:
        raise ZoompipeError(
            f"timm publishes no weights for {arch}; pass --weights FILE for encoder {encoder}"
        )
    try:
        return timm.create_model(arch, pretrained=True, **kwargs)
    except (OSError, RuntimeError) as err:
        # huggingface_hub and requests errors are OSErrors; the cause is kept chained.
        raise ZoompipeError(
            f"cannot download weights {arch} for encoder {encoder} (offline?); "
            "pass --weights FILE with a state dict (.safetensors or torch file)"
        ) from err


@dataclass(frozen=True)
class HubFile:
    """Where an encoder's weights live on the Hugging Face hub.

    Attributes
    ----------
    repo_id : str
    filenames : tuple of str
        Names the weights go by, in order of preference (``model.safetensors`` before
        ``pytorch_model.bin``); the hub is asked for each in turn.
    subfolder : str, optional
    repo_type : {"model", "dataset"}
    """

    repo_id: str
    filenames: tuple[str, ...]
    subfolder: str | None = None
    repo_type: str = "model"

    @property
    def page(self) -> str:
        """The repository's web page, where gated terms are accepted."""
        # huggingface_hub reads the same variable; not importing it keeps the CLI's help fast.
        endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        kind = "datasets/" if self.repo_type == "dataset" else ""
        return f"{endpoint.rstrip('/')}/{kind}{self.repo_id}"

    def paths(self) -> list[str]:
        """The files' paths inside the repository."""
        return [f"{self.subfolder}/{name}" if self.subfolder else name for name in self.filenames]


def locate_weights(hub: HubFile, encoder: str, given: Path | None) -> Path:
    """The weights file of ``encoder``: ``given`` itself, the file inside folder ``given``, or
    the hub's file (from the local cache when it is there, else downloaded).

    Parameters
    ----------
    hub : HubFile
    encoder : str
        Encoder name, for messages.
    given : Path, optional
        A weights file; or a folder holding one under a name of ``hub.filenames``: a copied
        snapshot, a Hugging Face cache repository folder (``models--org--name``) or a cache
        root (``$HF_HOME/hub``).

    Raises
    ------
    ZoompipeError
        One line: nothing found in the folder; the hub unreachable, offline without the file
        cached, or gated (naming the page whose terms to accept and ``HF_TOKEN``).
    """
    if given is None:
        return _download(hub, encoder)
    if given.is_file():
        return given
    if not given.is_dir():
        raise ZoompipeError(f"weights for encoder {encoder} not found: {given}")
    cache_name = f"{hub.repo_type}s--{hub.repo_id.replace('/', '--')}"
    for root in (given, given / cache_name, given / "hub" / cache_name):
        snapshots = root / "snapshots"
        folders = [root] + (sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
                            if snapshots.is_dir() else [])
        for folder in folders:
            for relative in hub.paths() + list(hub.filenames):
                if (folder / relative).is_file():
                    return folder / relative
    raise ZoompipeError(f"no weights for encoder {encoder} in {given}: expected {' or '.join(hub.filenames)} "
                        f"(of {hub.page}) there, in a snapshot of it, or in its Hugging Face cache folder")


def _download(hub: HubFile, encoder: str) -> Path:
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub import errors

    for path in hub.paths():
        cached = try_to_load_from_cache(hub.repo_id, path, repo_type=hub.repo_type)
        if isinstance(cached, str):
            return Path(cached)
    where = f"{hub.repo_id}/{hub.paths()[0]}"
    fix = "download them where there is network and pass --weights FILE_OR_FOLDER"
    if constants.HF_HUB_OFFLINE:
        raise ZoompipeError(f"encoder {encoder}: weights {where} are not in the Hugging Face cache "
                            f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set; {fix}")
    _check_reachable(constants.ENDPOINT, encoder, where, fix)
    for name in hub.filenames:
        try:
            return Path(hf_hub_download(hub.repo_id, name, subfolder=hub.subfolder, repo_type=hub.repo_type,
                                        endpoint=constants.ENDPOINT))
        except (errors.GatedRepoError, errors.RepositoryNotFoundError) as err:
            status = getattr(getattr(err, "response", None), "status_code", None)
            if status == 403:
                raise ZoompipeError(f"encoder {encoder}: {hub.repo_id} is gated and the account of HF_TOKEN has "
                                    f"no access yet: accept its terms at {hub.page}") from None
            token = "the token in HF_TOKEN was refused" if os.environ.get("HF_TOKEN") else "no token was sent"
            raise ZoompipeError(f"encoder {encoder}: {hub.repo_id} refused the download ({status}, {token}): "
                                f"accept its terms at {hub.page} and set HF_TOKEN to a read token of "
                                "that account") from None
        except errors.EntryNotFoundError:
            continue
        except (errors.LocalEntryNotFoundError, OSError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ZoompipeError(f"encoder {encoder}: cannot download {where} ({reason}); {fix}") from None
    raise ZoompipeError(f"encoder {encoder}: {hub.page} has none of {', '.join(hub.paths())}")


def _check_reachable(endpoint: str, encoder: str, where: str, fix: str) -> None:
    """Fail in seconds, not after a minute of retries, when the hub cannot be reached."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # the proxy is what would be reached; let the download say
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=5).close()
    except OSError as err:
        raise ZoompipeError(f"encoder {encoder}: cannot reach {endpoint} to download {where} "
                            f"({err.strerror or err}); {fix}") from None
