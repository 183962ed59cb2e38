"""A trained SASRec as a folder: ``config.json`` (the :class:`SASRecConfig`) and
``model.safetensors`` (the state dict, the configuration repeated in its metadata), each written
atomically.

:func:`load_sasrec` parses both as data only, checks every field and every tensor name, shape
and dtype, and raises ``ValueError`` naming the file for anything else; nothing is unpickled. It
reads the tensor names, shapes and dtypes from the safetensors header before anything is
allocated, rather than handing the file to ``safetensors.torch.load_model(strict=True)``: that
builds the model first (a configuration claiming 10^12 items would allocate before it fails),
and copying into the model's parameters turns a float64 tensor into float32 without a word.
:func:`save_sasrec` serialises with ``safetensors.torch.save`` and writes the bytes atomically,
where ``save_model`` would write the file in place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..files import atomic_open, atomic_write_bytes
from .model import SASRec, SASRecConfig

__all__ = ["CONFIG_FILE", "FORMAT_NAME", "FORMAT_VERSION", "WEIGHTS_FILE", "load_sasrec",
           "save_sasrec"]

FORMAT_NAME = "flower_rec.sasrec"  # the name in the files, kept when the module moved
FORMAT_VERSION = "1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_sasrec(model: SASRec, path: str | os.PathLike) -> Path:
    """Writes ``config.json`` and ``model.safetensors`` into the folder ``path`` (created),
    each atomically; returns the folder."""
    from safetensors.torch import save

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    metadata = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                "config": json.dumps(config, sort_keys=True)}
    atomic_write_bytes(folder / WEIGHTS_FILE, save(state, metadata=metadata))
    with atomic_open(folder / CONFIG_FILE, "w", encoding="utf-8") as handle:
        handle.write(json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION, **config},
                                indent=2) + "\n")
    return folder


def load_sasrec(path: str | os.PathLike, device: torch.device | str | None = None) -> SASRec:
    """Reads a folder written by :func:`save_sasrec`, in eval mode. Both files are parsed as
    data only; a missing, foreign, inconsistent or corrupt file raises ``ValueError`` (a missing
    folder ``FileNotFoundError``)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such SASRec model folder")
    config = _read_config(folder / CONFIG_FILE)
    # shapes from a model on the meta device: nothing is allocated (a config claiming
    # 10^12 items fails on the shapes) and the caller's RNG is not used
    with torch.device("meta"):
        model = SASRec(config)
    expected = {name: list(t.shape) for name, t in model.state_dict().items()}
    state = _read_weights(folder / WEIGHTS_FILE, config, expected, folder / CONFIG_FILE)
    model = model.to_empty(device="cpu")
    model.load_state_dict(state, strict=True)
    return model.to(device if device is not None else "cpu").eval()


def _read_config(path: Path) -> SASRecConfig:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: missing (not a SASRec model folder)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable JSON file: {error}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        found = raw.get("format") if isinstance(raw, dict) else None
        raise ValueError(f"{path}: not a SASRec configuration (format {found!r})")
    if raw.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format version {raw.get('version')!r}; this flower_rec reads "
            f"version {FORMAT_VERSION}"
        )
    fields = {k: v for k, v in raw.items() if k not in ("format", "version")}
    try:
        return SASRecConfig.from_dict(fields)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None


def _read_weights(
    path: Path, config: SASRecConfig, expected: dict[str, list[int]], config_path: Path
) -> dict[str, torch.Tensor]:
    """The state dict in ``path``, once its metadata, tensor names, shapes and dtypes match
    ``config`` and the ``expected`` shapes, and every value is finite."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT_NAME or metadata.get("version") != FORMAT_VERSION:
                raise ValueError(f"{path}: not a SASRec weights file of version {FORMAT_VERSION}")
            try:
                stored = json.loads(metadata.get("config", ""))
            except json.JSONDecodeError:
                stored = None
            if stored != config.to_dict():
                raise ValueError(
                    f"{path} was saved with another configuration than {config_path} "
                    "(an interrupted save?)"
                )
            names = set(handle.keys())
            if names != set(expected):
                missing = sorted(set(expected) - names)
                extra = sorted(names - set(expected))
                raise ValueError(
                    f"{path}: tensors do not match the configuration "
                    f"(missing {missing}, unexpected {extra})"
                )
            for name, shape in expected.items():
                found = handle.get_slice(name)
                if found.get_dtype() != "F32" or list(found.get_shape()) != shape:
                    raise ValueError(
                        f"{path}: tensor {name!r} is {found.get_dtype()} "
                        f"{list(found.get_shape())}, expected F32 {shape}"
                    )
            state = {name: handle.get_tensor(name) for name in expected}
    except FileNotFoundError:
        raise ValueError(f"{path}: missing (not a SASRec model folder)") from None
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a readable safetensors file: {error}") from None
    for name, tensor in state.items():
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{path}: tensor {name!r} holds NaN or infinity")
    return state
