"""Load a Hugging Face checkpoint folder of this project, checking every file before using it.

    from complexity.checkpoint_folder import load_checkpoint_folder
    model, tokenizer = load_checkpoint_folder("runs/tiny/final", device="cpu", dtype=torch.float32)

A folder is ``config.json`` + ``model.safetensors`` (or ``model.safetensors.index.json`` and
its shards) + optionally the tokenizer files. Everything that loads such a folder (the inference
engine, ``complexity generate / serve / eval / info``) goes through here, so a broken folder
gives one `CheckpointError` naming the file and the field, never a traceback and never a model
whose missing weights were silently left random. Checked, in order, before any weight is read:

- the folder: exists, is a folder, is not empty;
- ``config.json``: UTF-8 JSON object; ``model_type`` is ``"complexity"`` (an upstream
  complexity-deep or TR-Hash folder is named as such: convert it with ``complexity convert``;
  upstream's TR-Hash MLX export, which also says ``"complexity"``, is told by its fields or its
  route-table names);
  every field passes `ComplexityConfig`'s checks and the special-token ids are in the vocabulary;
- the weights: every safetensors file opens and its header parses (truncated, empty and garbage
  files are caught here); a sharded index names only shards that exist and agrees with them;
  the tensors are exactly those of the model ``config.json`` describes (a tied ``lm_head`` may
  be absent), with its shapes; the routing table's expert ids lie in ``[0, num_experts)``, and
  each hash_routed layer's route table gives every token k distinct experts in that range;
- dtypes: floating weights may be stored as float32, bfloat16, float16 or float64 (they are
  cast to the requested dtype on load; a bf16 checkpoint is fine); integer, bool and float8
  tensors where a float weight belongs are refused; the routing tables must be int64;
- the tokenizer (when loaded): its JSON files parse, it loads, it has no more tokens than the
  model has embeddings (``len(tokenizer) <= vocab_size``) and its special-token ids are in range.

Transformers' own loading report (``output_loading_info``) is checked too: any missing,
unexpected or mismatched key is an error.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data.files import FileFormatError, read_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# Weights this loader does not read (pickles can run code; other frameworks).
FOREIGN_WEIGHT_FILES = (
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "model.pt",
    "tf_model.h5",
    "flax_model.msgpack",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# JSON files a folder may carry beside the weights; each must parse when present.
SIDE_JSON_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "generation_config.json",
)
FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}
MODEL_TYPE = "complexity"

# How upstream folders identify themselves (model_type, or fields / architectures only they have).
UPSTREAM_DEEP = "an upstream complexity-deep checkpoint"
UPSTREAM_MODEL_TYPES = {
    "complexity-deep": UPSTREAM_DEEP,
    "deep": "an upstream TR-Hash checkpoint (vLLM 'deep' export)",
    "tr_hash_moe": "an upstream TR-Hash MoE checkpoint (Hugging Face bundle)",
}
# complexity-deep's configs say no model_type (or ours): these fields tell them from TR-Hash's
UPSTREAM_DEEP_FIELDS = {"use_token_routed_mlp", "use_mu_guidance"}
UPSTREAM_FIELDS = {
    *UPSTREAM_DEEP_FIELDS,
    "routing_strategy",
    "source_mlp_type",
    "top_k",
    "route_hash_count",
    "attention_type",
}
UPSTREAM_ARCHITECTURES = {"DeepForCausalLM", "TRHashForCausalLM"}
OUR_FIELDS = {"mlp_type", "mu_mode", "routing"}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_LIST_MAX = 4  # names listed in a message before "(+N more)"


class CheckpointError(FileFormatError):
    """A checkpoint folder is unusable; the message names the file and the field at fault."""


@dataclass
class TensorInfo:
    file: Path
    shape: list[int]
    dtype: str  # safetensors' name: F32, BF16, I64, ...


@dataclass
class CheckpointFolder:
    """What `inspect_checkpoint_folder` found (nothing loaded but the routing table)."""

    path: Path
    config: object  # ComplexityConfig
    weight_files: list[Path]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def has_tokenizer(self) -> bool:
        return any((self.path / name).is_file() for name in TOKENIZER_FILES)

    @property
    def stored_dtypes(self) -> list[str]:
        return sorted({t.dtype for t in self.tensors.values()})


def _names(items, limit: int = _LIST_MAX) -> str:
    items = list(items)
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# ----------------------------------------------------------------------------- the folder and config.json


def _check_folder(path) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder}: is a file, not a checkpoint folder (give the folder that holds "
            f"{CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    if not any(folder.iterdir()):
        raise CheckpointError(f"{folder}: empty folder, not a checkpoint (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    if not (folder / CONFIG_FILE).exists():
        hint = ""
        if (folder / "meta.json").is_file() or (folder / "checkpoints").is_dir() or (folder / "final").is_dir():
            hint = (
                "; this is a training run or checkpoint: its Hugging Face export is RUN/final "
                "(`complexity eval` also reads training checkpoints)"
            )
        raise CheckpointError(f"{folder}: no {CONFIG_FILE}: not a Hugging Face checkpoint folder{hint}")
    return folder


def upstream_kind(cfg: dict) -> str | None:
    """What upstream checkpoint a config.json describes (a phrase for messages), or None."""
    model_type = cfg.get("model_type")
    if model_type in UPSTREAM_MODEL_TYPES:
        return UPSTREAM_MODEL_TYPES[model_type]
    if model_type is None and cfg.get("mlp_type") == "tr_hash_engine":
        return "an upstream TR-Hash checkpoint (native format)"
    architectures = set(cfg.get("architectures") or []) if isinstance(cfg.get("architectures"), list) else set()
    if model_type in (None, MODEL_TYPE) and not (OUR_FIELDS & set(cfg)):
        if "DeepForCausalLM" in architectures or UPSTREAM_DEEP_FIELDS & set(cfg):
            return UPSTREAM_DEEP
        if architectures & UPSTREAM_ARCHITECTURES or UPSTREAM_FIELDS & set(cfg):
            return "an upstream TR-Hash checkpoint (native format)" if model_type is None else UPSTREAM_DEEP
    return None


def _upstream_mlx(folder: Path, cfg: dict) -> str | None:
    """Why `cfg` is upstream's TR-Hash MLX export, which says model_type "complexity" as ours does
    (the converter's own test: upstream's fields in config.json, or its route-table names)."""
    if cfg.get("model_type") != MODEL_TYPE:
        return None
    from .integrations.upstream.readers import peek_tensor_names
    from .integrations.upstream.trhash.layouts import MLX, trhash_layout

    found = trhash_layout(cfg, peek_tensor_names(folder))
    return found[1] if found is not None and found[0] == MLX else None


def read_checkpoint_config(folder: Path):
    """The `ComplexityConfig` of a folder's config.json, or a `CheckpointError` naming the field."""
    from .configuration_complexity import ComplexityConfig

    path = folder / CONFIG_FILE
    try:
        cfg = read_json(path)
    except FileFormatError as err:
        raise CheckpointError(str(err)) from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    mlx = _upstream_mlx(folder, cfg)
    if mlx is not None:
        raise CheckpointError(
            f"{path}: this is upstream's TR-Hash MLX export ({mlx}), not this project's format, although both "
            f"say model_type {MODEL_TYPE!r}: convert it with `complexity convert {folder} OUT` and load OUT"
        )
    upstream = upstream_kind(cfg)
    if upstream is not None:
        raise CheckpointError(
            f"{path}: {upstream}, not this project's format: convert it with "
            f"`complexity convert {folder} OUT` and load OUT"
        )
    model_type = cfg.get("model_type")
    if model_type is None:
        raise CheckpointError(
            f'{path}: no model_type field: not a Hugging Face model config (expected "model_type": "{MODEL_TYPE}")'
        )
    if model_type != MODEL_TYPE:
        raise CheckpointError(
            f"{path}: model_type {model_type!r} is not a Complexity model ({MODEL_TYPE!r}); this "
            "loads Complexity checkpoints only (upstream complexity-deep / TR-Hash folders: "
            "`complexity convert`)"
        )
    try:
        with _quiet_transformers():  # it warns about token ids outside the vocabulary, which ComplexityConfig refuses
            config = ComplexityConfig.from_dict(cfg)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        message = str(err).removeprefix("ComplexityConfig.")
        raise CheckpointError(f"{path}: {message}") from None
    return config


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' config warnings go to stderr as log lines; while a config is read here,
    its problems are reported as one error instead."""
    logger = logging.getLogger("transformers.configuration_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _skeleton(config, path: Path):
    """The model config.json describes, on the meta device (no memory, no init cost)."""
    from .modeling_complexity import ComplexityForCausalLM

    try:
        with torch.device("meta"):
            return ComplexityForCausalLM(config)
    except (ValueError, TypeError, RuntimeError) as err:  # e.g. a field of the wrong type
        raise CheckpointError(f"{path}: describes no buildable model: {err}") from None


# ----------------------------------------------------------------------------- weights


def _weight_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files to read, and the index's tensor -> file map when sharded."""
    single, index = folder / WEIGHTS_FILE, folder / WEIGHTS_INDEX
    if single.exists():
        return [single], None
    if index.exists():
        try:
            data = read_json(index)
        except FileFormatError as err:
            raise CheckpointError(str(err)) from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if (
            not isinstance(weight_map, dict)
            or not weight_map
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())
        ):
            raise CheckpointError(f"{index}: weight_map: expected a non-empty object of tensor name -> shard file")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            rel = Path(shard)
            if rel.is_absolute() or ".." in rel.parts:
                raise CheckpointError(f"{index}: weight_map names {shard!r}, which is not a file inside the folder")
            if not (folder / rel).is_file():
                raise CheckpointError(f"{index}: weight_map names shard {shard}, which is missing from {folder}")
        return [folder / s for s in shards], weight_map
    foreign = [name for name in FOREIGN_WEIGHT_FILES if (folder / name).exists()]
    if foreign:
        raise CheckpointError(
            f"{folder}: no {WEIGHTS_FILE}, only {', '.join(foreign)}: this loads safetensors only "
            "(a pickled file can run code); re-save the model with save_pretrained"
        )
    raise CheckpointError(f"{folder}: no weights: neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX}")


def read_tensor_headers(folder: Path) -> tuple[list[Path], dict[str, TensorInfo]]:
    """Open every safetensors file and read its header: name -> (file, shape, dtype)."""
    from safetensors import SafetensorError, safe_open

    files, weight_map = _weight_files(folder)
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        if path.is_dir():
            raise CheckpointError(f"{path}: is a folder, expected a safetensors file")
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: empty file (0 bytes): the weights were not written")
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    piece = f.get_slice(name)
                    if name in tensors:
                        raise CheckpointError(f"{path}: tensor {name} is also in {tensors[name].file.name}")
                    tensors[name] = TensorInfo(path, list(piece.get_shape()), piece.get_dtype())
        except SafetensorError as err:
            reason = str(err).removeprefix("Error while deserializing header: ")
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt: {reason})") from None
        except OSError as err:
            raise CheckpointError(f"{path}: cannot read: {err.strerror or err}") from None
    if weight_map is not None:
        index = folder / WEIGHTS_INDEX
        for name, shard in weight_map.items():
            info = tensors.get(name)
            if info is None or info.file != folder / shard:
                where = f"it is in {info.file.name}" if info else "no shard holds it"
                raise CheckpointError(f"{index}: weight_map puts {name} in {shard}, but {where}")
        stray = sorted(set(tensors) - set(weight_map))
        if stray:
            raise CheckpointError(
                f"{index}: weight_map does not list {_names(stray)}, stored in {tensors[stray[0]].file.name}"
            )
    return files, tensors


def _describe(config) -> str:
    parts = [
        f"vocab_size={config.vocab_size}",
        f"hidden_size={config.hidden_size}",
        f"num_hidden_layers={config.num_hidden_layers}",
        f"mlp_type={config.mlp_type}",
    ]
    if config.mu_mode != "none":
        parts.append(f"mu_mode={config.mu_mode}")
    if config.shared_expert:
        parts.append("shared_expert=true")
    return ", ".join(parts)


def _layers(names) -> set[int]:
    return {int(m.group(1)) for m in map(_LAYER.match, names) if m}


def check_tensors(folder: Path, config, tensors: dict[str, TensorInfo], skeleton) -> None:
    """The stored tensors against the model config.json describes: names, shapes, dtypes, the
    routing tables' values. Of several problems, the first in that order is raised."""
    where = _weights_name(tensors)
    if not tensors:
        raise CheckpointError(f"{folder / where}: holds no tensors")
    expected = skeleton.state_dict()
    tied = set((getattr(skeleton, "all_tied_weights_keys", None) or {}) if config.tie_word_embeddings else ())
    _check_names(folder, where, config, tensors, expected, tied)
    _check_shapes(folder, where, config, tensors, expected)
    _check_dtypes(tensors, expected)
    _check_values(config, tensors, skeleton, tied)


def _weights_name(tensors: dict[str, TensorInfo]) -> str:
    """The file a message names: the one file that holds the tensors, else the index."""
    files = {t.file.name for t in tensors.values()}
    return files.pop() if len(files) == 1 else WEIGHTS_INDEX if files else WEIGHTS_FILE


def _check_names(folder: Path, where: str, config, tensors, expected, tied: set[str]) -> None:
    """Exactly the model's tensors; a tied copy may be left out."""
    unexpected = sorted(set(tensors) - set(expected))
    missing = sorted(k for k in expected if k not in tensors and k not in tied)
    if not (missing or unexpected):
        return
    stored_layers = _layers(tensors)
    # Whole layers too many or too few: name the field at fault rather than every tensor of them.
    if stored_layers and max(stored_layers) + 1 != config.num_hidden_layers:
        raise CheckpointError(
            f"{folder / CONFIG_FILE}: num_hidden_layers={config.num_hidden_layers}, but {where} holds layers "
            f"0..{max(stored_layers)} ({max(stored_layers) + 1} layers)"
        )
    if missing:
        raise CheckpointError(
            f"{folder / where}: missing tensor(s) {_names(missing)} of the model {CONFIG_FILE} "
            f"describes ({_describe(config)}); loading would leave them random"
        )
    raise CheckpointError(
        f"{folder / where}: unexpected tensor(s) {_names(unexpected)}, not part of the model "
        f"{CONFIG_FILE} describes ({_describe(config)})"
    )


def _check_shapes(folder: Path, where: str, config, tensors, expected) -> None:
    # The embedding is there (_check_names): a wrong vocab_size or hidden_size shows in it first.
    embed = tensors["model.embed_tokens.weight"]
    if embed.shape != [config.vocab_size, config.hidden_size]:
        raise CheckpointError(
            f"{folder / CONFIG_FILE}: vocab_size={config.vocab_size}, hidden_size={config.hidden_size} "
            f"contradict model.embed_tokens.weight {embed.shape} in {embed.file.name}"
        )
    wrong_shape = [
        f"{k} {tensors[k].shape} (expected {list(v.shape)})"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != list(v.shape)
    ]
    if wrong_shape:
        raise CheckpointError(
            f"{folder / where}: shape mismatch against {CONFIG_FILE} ({_describe(config)}): {_names(wrong_shape, 2)}"
        )


def _check_dtypes(tensors, expected) -> None:
    """Floating weights in one of FLOAT_DTYPES (cast on load); the routing tables in int64."""
    for name, ref in expected.items():
        info = tensors.get(name)
        if info is None:  # a tied copy left out
            continue
        if ref.is_floating_point() and info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{info.file}: tensor {name} has dtype {info.dtype}; weights must be floating point "
                f"({', '.join(FLOAT_DTYPES.values())})"
            )
        if not ref.is_floating_point() and info.dtype != "I64":
            raise CheckpointError(f"{info.file}: tensor {name} has dtype {info.dtype}, expected I64 (int64)")


def _check_values(config, tensors, skeleton, tied: set[str]) -> None:
    """The checks that read tensor data, not only the headers."""
    if tied and all(k in tensors for k in tied):  # a stored copy of a tied weight must equal its source
        _check_tied_copies(skeleton, tensors)
    table = tensors.get("model.token_to_expert")
    if table is not None:
        _check_routing_table(table, config)
    for name, info in tensors.items():
        if name.endswith(".mlp.route_table"):
            _check_route_table(name, info, config)


def _read_tensor(info: TensorInfo, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(info.file), framework="pt") as f:
        return f.get_tensor(name)


def _check_tied_copies(skeleton, tensors: dict[str, TensorInfo]) -> None:
    for target, source in skeleton.all_tied_weights_keys.items():
        if not torch.equal(_read_tensor(tensors[target], target), _read_tensor(tensors[source], source)):
            raise CheckpointError(
                f"{tensors[target].file}: {target} differs from {source}, which config.json ties it "
                "to (tie_word_embeddings=true): set tie_word_embeddings to false to keep it"
            )


def _check_routing_table(info: TensorInfo, config) -> None:
    from .modeling_complexity import expert_ids_outside

    problem = expert_ids_outside(_read_tensor(info, "model.token_to_expert"), config.num_experts)
    if problem is not None:
        raise CheckpointError(f"{info.file}: model.token_to_expert {problem}")


def _check_route_table(name: str, info: TensorInfo, config) -> None:
    """A hash_routed layer's [k, V] table: expert ids in [0, num_experts), k distinct per token."""
    from .hash_routing import check_route_table

    try:
        check_route_table(
            _read_tensor(info, name), config.num_experts, config.vocab_size, config.num_experts_per_tok, name=name
        )
    except ValueError as err:
        raise CheckpointError(
            f"{info.file}: {err} (num_experts={config.num_experts}, num_experts_per_tok={config.num_experts_per_tok})"
        ) from None


def _check_side_json(folder: Path) -> None:
    for name in SIDE_JSON_FILES:
        if (folder / name).exists():
            try:
                read_json(folder / name)
            except FileFormatError as err:
                raise CheckpointError(str(err)) from None


def inspect_checkpoint_folder(path) -> CheckpointFolder:
    """Every check above except loading: config, weights headers, tensors vs the config, the
    JSON side files. Raises `CheckpointError` (or FileNotFoundError) naming the file."""
    folder = _check_folder(path)
    config = read_checkpoint_config(folder)
    skeleton = _skeleton(config, folder / CONFIG_FILE)
    files, tensors = read_tensor_headers(folder)
    check_tensors(folder, config, tensors, skeleton)
    _check_side_json(folder)
    return CheckpointFolder(folder, config, files, tensors)


# ----------------------------------------------------------------------------- tokenizer


def _vocab_len(tokenizer) -> int:
    if hasattr(tokenizer, "get_vocab_size"):  # a `tokenizers.Tokenizer`
        return int(tokenizer.get_vocab_size(with_added_tokens=True))
    return len(tokenizer)


def check_tokenizer_fits(tokenizer, config, where) -> None:
    """A tokenizer belongs with a model only if every id it emits has an embedding."""
    n = _vocab_len(tokenizer)
    if n > config.vocab_size:
        raise CheckpointError(
            f"{where}: the tokenizer has {n} tokens but the model has vocab_size={config.vocab_size} embeddings "
            f"({CONFIG_FILE}): ids {config.vocab_size}..{n - 1} would have none; they do not belong together"
        )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        token_id = getattr(tokenizer, name, None)
        if isinstance(token_id, int) and not 0 <= token_id < config.vocab_size:
            raise CheckpointError(
                f"{where}: the tokenizer's {name}={token_id} is outside the model's vocabulary "
                f"[0, vocab_size={config.vocab_size})"
            )


def check_tokenizer_json(folder) -> None:
    """The folder's tokenizer.json is a tokenizer (its structure, not only its JSON), or the
    `CheckpointError` names the file."""
    from .data.tokenizer import TokenizerError, load_tokenizer

    try:
        load_tokenizer(folder)
    except TokenizerError as err:
        raise CheckpointError(str(err)) from None


def load_folder_tokenizer(folder) -> object:
    """The folder's tokenizer (transformers AutoTokenizer), each of its files checked first."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    _check_side_json(folder)
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"{folder}: has tokenizer_config.json but no tokenizer.json")
    check_tokenizer_json(folder)
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:  # transformers raises many kinds for a bad tokenizer_config.json
        raise CheckpointError(
            f"{folder / 'tokenizer_config.json'}: cannot load the tokenizer: {type(err).__name__}: {err}"
        ) from None


# ----------------------------------------------------------------------------- loading


def load_checkpoint_folder(
    path,
    *,
    device="cpu",
    dtype: torch.dtype | None = torch.float32,
    attn_implementation: str | None = None,
    tokenizer=True,
    check=None,
):
    """(model, tokenizer) from a checked folder. ``dtype``: the weights' dtype after loading
    (None: as stored). ``tokenizer``: True loads the folder's (None when it has no tokenizer
    files), False/None loads none, a tokenizer object is checked against the model and returned.
    ``check(config)``: the caller's own checks (e.g. against data), run before any weight is read."""
    from .modeling_complexity import ComplexityForCausalLM

    found = inspect_checkpoint_folder(path)
    tok = None  # the tokenizer first: it is cheap, and a mismatch should not wait for the weights
    if tokenizer is True:
        tok = load_folder_tokenizer(found.path) if found.has_tokenizer else None
    elif tokenizer not in (None, False):
        tok = tokenizer
    if tok is not None:
        check_tokenizer_fits(tok, found.config, found.path)
    if check is not None:
        check(found.config)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model, info = ComplexityForCausalLM.from_pretrained(
        found.path,
        config=found.config,
        dtype=dtype if dtype is not None else "auto",
        output_loading_info=True,
        **kwargs,
    )
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:  # the checks above should make this unreachable; never hand out random weights
        raise CheckpointError(f"{found.path}: loading reported {problems}")
    return model.to(device).eval(), tok
