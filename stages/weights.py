"""Weights files: fetched once into the zoo's cache, read once, recorded by sha256.

Where the bytes come from (see stages/zoo.py for which weights a setting names):
- a local file: read as it is;
- a URL (torchvision's weights, and timm's few without a hub copy): torch.hub's
  cache, `$TORCH_HOME/hub/checkpoints/<file name in the URL>`. A download is checked
  against the hash in that name (`-<sha256 prefix>.pth`), as torch.hub does; a file
  already there is loaded unchecked, so a file dropped there by hand is used as it is;
- the Hugging Face hub (timm's weights): huggingface_hub's cache under `HF_HOME`,
  which checks what it downloads.

Offline: with HF_HUB_OFFLINE=1 (huggingface_hub's switch) nothing is downloaded from
either zoo, and weights that are not cached are one line saying where the file goes.

The sha256 is of the very bytes that are loaded: the file is read once, hashed, and
the state dict is parsed from those bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from stages.common import UserError
from stages.zoo import HF_HUB_PREFIX, WeightsRef

HF_URL = "https://huggingface.co"
# Prefixes that wrappers add to state-dict keys: DDP ("module.") and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class LoadedWeights:
    """Weights as loaded: what train records in train_details.json and the MLflow run."""

    setting: str  # train.pretrained as given
    name: str  # e.g. ResNet18_Weights.IMAGENET1K_V1, tf_efficientnet_lite0.in1k, a path
    source: str  # the URL, hf-hub:<repo id>, or the local file
    file: str  # the file that was read: in a zoo's cache, or the local file
    sha256: str  # of the bytes that were loaded
    new: tuple[str, ...] = ()  # the model's tensors they did not provide: its new head

    def record(self) -> dict[str, str]:
        """As a flat dict, for train_details.json and MLflow params (`pretrained.*`)."""
        return {k: v for k, v in asdict(self).items() if k != "new"}


def load_weights(ref: WeightsRef, setting: object) -> tuple[dict[str, torch.Tensor],
                                                             LoadedWeights]:
    """The state dict the reference names, fetched if need be, and how it was loaded."""
    path = fetch(ref)
    state, sha = read_state_dict(path)
    source = f"{HF_HUB_PREFIX}{ref.location}" if ref.kind == "hf-hub" else ref.location
    return state, LoadedWeights(str(setting), ref.label, source, str(path), sha)


def fetch(ref: WeightsRef) -> Path:
    """The weights file: the local file, or the zoo's cached copy, downloaded if missing."""
    if ref.kind == "file":
        return Path(ref.location)
    if ref.kind == "url":
        return _fetch_url(ref)
    return _fetch_hub(ref)


# ---------------------------------------------------------------------------- torch.hub

def torch_cache_path(url: str) -> Path:
    """Where torch.hub keeps a URL's file: $TORCH_HOME/hub/checkpoints/<name in the URL>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _fetch_url(ref: WeightsRef) -> Path:
    path = torch_cache_path(ref.location)
    if path.is_file():
        return path  # torch.hub's rule: a cached file is trusted
    if offline():
        _url_not_cached(ref, path, "HF_HUB_OFFLINE is set")
    found = torch.hub.HASH_REGEX.search(path.name)  # e.g. resnet18-f37072fd.pth
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {ref.label} from {ref.location} to {path}", flush=True)
    try:  # to a temporary file beside it, moved into place only when complete and checked
        torch.hub.download_url_to_file(ref.location, str(path),
                                       found.group(1) if found else None, progress=True)
    except (OSError, RuntimeError) as err:  # URLError, timeouts, a wrong hash
        _url_not_cached(ref, path, _reason(err))
    return path


def offline() -> bool:
    """Whether downloads are off: huggingface_hub's HF_HUB_OFFLINE, which imgpipe also obeys."""
    from huggingface_hub import is_offline_mode

    return is_offline_mode()


# ---------------------------------------------------------------------------- hugging face hub

def hub_cache_path(repo_id: str) -> Path:
    """huggingface_hub's cache folder for a model repo: $HF_HOME/hub/models--<owner>--<name>."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def _fetch_hub(ref: WeightsRef) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo_id, _, revision = ref.location.partition("@")
    missing: LocalEntryNotFoundError | None = None
    with hub_errors(ref.label, ref.location, ref.files[0]):
        for filename in ref.files:  # the first file the repo has, as timm does
            try:
                return Path(hf_hub_download(repo_id, filename, revision=revision or None,
                                            library_name="imgpipe"))
            except LocalEntryNotFoundError as err:  # not cached, and offline or unreachable
                missing = missing or err
                if not offline():
                    break  # unreachable: the next file would wait out the same retries
            except EntryNotFoundError:  # the repo has no such file: try the next
                continue
        if missing is not None:
            raise missing
    raise UserError(f"{HF_HUB_PREFIX}{ref.location} holds none of {', '.join(ref.files)}: "
                    "it is no timm model repo; check train.pretrained")


@contextlib.contextmanager
def hub_errors(label: str, repo: str, filename: str) -> Iterator[None]:
    """Turn huggingface_hub's errors for a file of a hub repo into one line each."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except LocalEntryNotFoundError:  # before EntryNotFoundError, its base class
        _hub_not_cached(label, repo, filename)
    except RepositoryNotFoundError:
        raise UserError(f"{HF_HUB_PREFIX}{repo} is not on the Hugging Face hub (or is private "
                        "or gated): check train.pretrained") from None
    except RevisionNotFoundError:
        raise UserError(f"{HF_HUB_PREFIX}{repo}: no such revision on the hub; check the part "
                        "after @ in train.pretrained") from None
    except EntryNotFoundError:
        raise UserError(f"{HF_HUB_PREFIX}{repo} has no {filename}: it is no timm model repo; "
                        "check train.pretrained") from None
    except HfHubHTTPError as err:
        raise UserError(f"fetching {filename} of {HF_HUB_PREFIX}{repo} failed "
                        f"({_reason(err)}): try again, or set train.pretrained to a local "
                        "file") from None


def _hub_not_cached(label: str, repo: str, filename: str) -> None:
    """Raise the one line for a hub file that is neither cached nor downloadable."""
    repo_id, _, revision = repo.partition("@")
    weights = filename if filename != "config.json" else "model.safetensors"
    url = f"{HF_URL}/{repo_id}/resolve/{revision or 'main'}/{weights}"
    why = "HF_HUB_OFFLINE is set" if offline() else "the hub cannot be reached"
    raise UserError(f"pretrained weights {label} are not cached and cannot be downloaded "
                    f"({why}): `hf download {repo_id} {filename}` on a machine online fills "
                    f"huggingface_hub's cache, copy its {hub_cache_path(repo_id).name} folder "
                    f"to {hub_cache_path(repo_id)}; or download {url} anywhere and set "
                    f"train.pretrained: path/to/{weights}") from None


# ---------------------------------------------------------------------------- messages

def _url_not_cached(ref: WeightsRef, path: Path, why: str) -> None:
    """Raise the one line for a URL's file that is neither cached nor downloadable."""
    raise UserError(f"pretrained weights {ref.label} are not cached and cannot be downloaded "
                    f"({why}): download {ref.location} to {path}, or anywhere and set "
                    f"train.pretrained: path/to/{path.name}") from None


def _reason(err: BaseException) -> str:
    """The error's type and first line, e.g. 'URLError: [Errno -3] Temporary failure ...'."""
    lines = str(getattr(err, "reason", None) or err).splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


# ---------------------------------------------------------------------------- reading files

def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors in a weights file and the sha256 of its bytes.

    A plain state dict, an imgpipe model or a checkpoint, saved by torch.save or as
    safetensors; keys lose the prefixes that DDP and torch.compile add.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"pretrained weights file {path} not found: set train.pretrained in "
                        "params.yaml to an existing file, true (the model's default weights), "
                        "a weights tag, or null") from None
    except OSError as err:
        raise UserError(f"pretrained weights file {path} cannot be read ({_reason(err)}): "
                        "check its permissions") from None
    sha = hashlib.sha256(data).hexdigest()
    try:
        if _is_safetensors(path, data):
            from safetensors.torch import load

            state = load(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any parse failure means the same thing
        raise UserError(f"pretrained weights {path} cannot be read ({type(err).__name__}): "
                        "save them with torch.save(model.state_dict(), path)") from None
    for key in ("state_dict", "model", "model_state_dict"):  # imgpipe, timm, common scripts
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"pretrained weights {path} hold no state dict of tensors")
    return {_strip_prefixes(k): v for k, v in state.items()}, sha


def _is_safetensors(path: Path, data: bytes) -> bool:
    # safetensors: an 8-byte header length, then the JSON header; torch.save: a zip ("PK").
    return path.suffix == ".safetensors" or (len(data) > 8 and data[8:9] == b"{")


def _strip_prefixes(key: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key
