"""Reading an upstream checkpoint folder: its config.json and its weights, whatever the file kind.

Nothing executes code from a checkpoint: ``.pt`` files are read with ``weights_only=True``.
Every failure is an `UpstreamFormatError` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .formats import UpstreamFormatError

# Weight files, in the order they are looked for.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "model.pt", "pytorch_model.bin")
# Copied to DST when SRC has them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# Wrappers of a state dict inside a .pt file (training checkpoints).
PT_WRAPPERS = ("model_state_dict", "model", "state_dict")


def read_config_json(src: Path, problems: list[str]) -> dict | None:
    """SRC/config.json as a dict; None (with the reason appended to `problems`) when unusable."""
    path = src / "config.json"
    if not path.is_file():
        problems.append("no config.json: not an upstream checkpoint folder")
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        problems.append(f"config.json: not valid JSON ({err})")
        return None
    if not isinstance(config, dict):
        problems.append("config.json: not a JSON object")
        return None
    return config


def find_weights(src: Path) -> list[Path]:
    """The weight files present in SRC, in `WEIGHT_FILES` order (the first is the one read)."""
    return [src / name for name in WEIGHT_FILES if (src / name).is_file()]


def peek_tensor_names(src: Path) -> list[str]:
    """The tensor names of SRC's safetensors weights, from the headers only (nothing is loaded);
    [] when there are none or they cannot be read (the reading step reports why)."""
    from safetensors import safe_open

    found = [p for p in find_weights(src) if p.name.endswith((".safetensors", ".index.json"))]
    if not found:
        return []
    try:
        if found[0].name.endswith(".index.json"):
            return list(json.loads(found[0].read_text())["weight_map"])
        with safe_open(str(found[0]), framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception:  # noqa: BLE001 - unreadable weights are reported when they are read
        return []


def read_weights(path: Path, notes: list[str]) -> dict[str, torch.Tensor]:
    """The state dict in `path` (safetensors, a sharded safetensors index, or a torch file)."""
    if path.name.endswith(".index.json"):
        return _read_sharded_safetensors(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_torch(path, notes)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except Exception as err:  # SafetensorError, OSError, ...
        problem = f"cannot read {path.name}: truncated or corrupt safetensors file ({err})"
        raise UpstreamFormatError(path, [problem]) from err


def _read_sharded_safetensors(index: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UpstreamFormatError(index, [f"cannot read {index.name}: not a safetensors index ({err})"]) from err
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index.parent / shard
        if not shard_path.is_file():
            raise UpstreamFormatError(index, [f"shard {shard} named by {index.name} does not exist"])
        out.update(_read_safetensors(shard_path))
    missing = sorted(set(weight_map) - set(out))
    if missing:
        problem = f"key(s) listed in {index.name} but absent from the shards: {', '.join(missing)}"
        raise UpstreamFormatError(index, [problem])
    return out


def _read_torch(path: Path, notes: list[str]) -> dict[str, torch.Tensor]:
    """A .pt state dict, read with weights_only=True (no code from the file runs)."""
    err = None
    for mmap in (True, False):  # mmap needs the zip format; very old files are not
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception as e:  # noqa: BLE001 - reported below with the file name
            err = e
    else:
        first_line = str(err).splitlines()[0] if str(err) else ""
        problem = (
            f"cannot read {path.name} with torch.load(weights_only=True): truncated or corrupt file, or it holds "
            f"objects other than tensors and plain containers ({type(err).__name__}: {first_line})"
        )
        raise UpstreamFormatError(path, [problem]) from err
    if not isinstance(obj, dict):
        raise UpstreamFormatError(path, [f"{path.name} holds a {type(obj).__name__}, not a state dict"])
    for wrapper in PT_WRAPPERS:
        inner = obj.get(wrapper)
        if isinstance(inner, dict):
            others = sorted(str(k) for k in obj if k != wrapper)
            notes.append(
                f"state dict read from {path.name}[{wrapper!r}]"
                + (f"; training-state entries not converted: {', '.join(others)}" if others else "")
            )
            return inner
    return obj
