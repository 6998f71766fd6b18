"""Reading state-dict files safely and loading them with a readable mismatch report."""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ZoompipeError

if TYPE_CHECKING:
    import torch
    from torch import nn

# Training scripts save {"state_dict": ...} or {"model": ...} beside epoch counters.
_NESTING_KEYS = ("state_dict", "model")


def read_state_dict(path: str | Path, meta: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or of a torch file loaded with ``weights_only``.

    A checkpoint that nests its weights under ``"state_dict"`` or ``"model"`` is unwrapped,
    and a ``"module."`` prefix left by ``DataParallel`` is removed. Nothing is unpickled
    beyond tensors and plain containers.

    Parameters
    ----------
    path : str or Path
    meta : bool
        Return tensors on the ``meta`` device: names, shapes and dtypes only, read from the
        file's header (safetensors) or memory-mapped (torch), so checking that gigabytes of
        weights fit a model costs no memory.

    Raises
    ------
    ZoompipeError
        The file is missing, unreadable, pickles Python objects, or holds no state dict.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ZoompipeError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors" and meta:
            loaded = _safetensors_header(path)
        elif path.suffix == ".safetensors":
            loaded = load_file(path, device="cpu")
        else:
            # mmap reads no tensor data in the meta mode; pre-1.6 (non-zip) files cannot be
            # mapped, so the plain mode does not ask for it.
            loaded = torch.load(path, map_location="meta" if meta else "cpu", weights_only=True, mmap=meta)
    except pickle.UnpicklingError:
        raise ZoompipeError(
            f"weights file {path} pickles Python objects, which zoompipe never loads; "
            "re-save it as torch.save(model.state_dict()) or as .safetensors"
        ) from None
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError, EOFError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ZoompipeError(f"cannot read weights file {path}: {reason}") from None
    for key in _NESTING_KEYS:
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    if not (
        isinstance(loaded, Mapping)
        and loaded
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items())
    ):
        raise ZoompipeError(f"weights file {path} does not hold a state dict of named tensors")
    if all(key.startswith("module.") for key in loaded):
        return {key.removeprefix("module."): value for key, value in loaded.items()}
    return dict(loaded)


def _safetensors_header(path: Path) -> dict[str, torch.Tensor]:
    import torch
    from safetensors import safe_open

    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}
    tensors = {}
    with safe_open(path, framework="pt") as handle:
        for key in handle.keys():
            info = handle.get_slice(key)
            tensors[key] = torch.empty(info.get_shape(), dtype=dtypes[info.get_dtype()], device="meta")
    return tensors


def _optional(key: str) -> bool:
    # BatchNorm's step counter does nothing at inference and many exports drop it.
    return key.endswith("num_batches_tracked")


def load_checked(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str,
    encoder: str,
    ignore_prefixes: Iterable[str] = (),
) -> None:
    """Load ``state_dict`` into ``model`` by name, or raise one line saying what differs.

    Parameters
    ----------
    model : torch.nn.Module
        Receives the weights.
    state_dict : Mapping[str, torch.Tensor]
        Weights by parameter name.
    source : str
        File name for the error message.
    encoder : str
        Encoder name for the error message.
    ignore_prefixes : iterable of str
        Keys of parts the encoder cuts off (a classifier, a last stage); a file may or may
        not have them.
    """
    prefixes = tuple(ignore_prefixes)
    given = {k: v for k, v in state_dict.items() if not (prefixes and k.startswith(prefixes))}
    expected = model.state_dict()
    missing = [k for k in expected if k not in given and not _optional(k)]
    unexpected = [k for k in given if k not in expected]
    reshaped = [k for k in given if k in expected and given[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]!r})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})")
    if reshaped:
        key = reshaped[0]
        problems.append(
            f"{len(reshaped)} of another shape (e.g. {key!r}: file "
            f"{tuple(given[key].shape)}, model {tuple(expected[key].shape)})"
        )
    if problems:
        raise ZoompipeError(
            f"weights file {source} does not fit encoder {encoder}: {'; '.join(problems)}"
        )
    # Every required key was checked above; strict=False only lets num_batches_tracked be absent.
    # assign: a model built on the meta device takes the tensors themselves (copying is a no-op).
    on_meta = any(t.is_meta for t in expected.values())
    model.load_state_dict(given, strict=False, assign=on_meta)
