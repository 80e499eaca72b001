"""Byte-level BPE tokenizer: training, saving as a Hugging Face folder, loading and hashing.

The saved folder (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``)
loads with ``transformers.AutoTokenizer.from_pretrained(folder)``. Special tokens have fixed ids
that match ``ComplexityConfig`` defaults::

    </s> = 0 (eos)    <pad> = 1    <s> = 2 (bos)    <unk> = 3

Encoding adds no special tokens: ``data prepare`` appends ``</s>`` after every document itself.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from .files import DiskFullError, check_free_space, check_output_folder, is_disk_full, new_folder, write_json_atomic

EOS_TOKEN, PAD_TOKEN, BOS_TOKEN, UNK_TOKEN = "</s>", "<pad>", "<s>", "<unk>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, BOS_TOKEN, UNK_TOKEN]  # ids 0, 1, 2, 3
EOS_ID, PAD_ID, BOS_ID, UNK_ID = 0, 1, 2, 3

# Renders [{"role", "content"}, ...] as "User: ...\n\nAssistant: ..."; with
# add_generation_prompt the prompt ends in "Assistant:" for the model to continue.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first -%}{{ '\\n\\n' }}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{ 'User: ' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'Assistant: ' + message['content'] }}"
    "{%- elif message['role'] == 'system' -%}{{ 'System: ' + message['content'] }}"
    "{%- else -%}{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if messages | length > 0 -%}{{ '\\n\\n' }}{%- endif -%}{{ 'Assistant:' }}"
    "{%- endif -%}"
)

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


class TokenizerError(ValueError):
    """A tokenizer folder is missing, unreadable or inconsistent."""


def build_untrained_tokenizer():
    """An empty byte-level BPE pipeline: NFC normalisation, byte-level pre-tokenizer and decoder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | os.PathLike,
    *,
    min_frequency: int = 2,
    show_progress: bool = True,
    length: int | None = None,
    model_max_length: int = 2048,
    overwrite: bool = False,
) -> Path:
    """Train a byte-level BPE tokenizer on ``texts`` (documents) and save it to ``out_dir``.

    The folder is built under a temporary name next to ``out_dir`` and renamed at the end, so an
    interrupted run never leaves a folder that looks like a tokenizer. Returns ``out_dir``.
    """
    from tokenizers import pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(
            f"--vocab-size {vocab_size} is too small: byte-level BPE needs at least "
            f"{MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    if min_frequency < 0:
        raise TokenizerError(f"--min-frequency must be >= 0, got {min_frequency}")
    if model_max_length < 1:
        raise TokenizerError(f"--model-max-length must be positive, got {model_max_length}")
    out = Path(out_dir)
    _check_out(out, overwrite)

    tok = build_untrained_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    count = [0]

    def counted() -> Iterator[str]:
        for text in texts:
            count[0] += 1
            yield text

    tok.train_from_iterator(counted(), trainer=trainer, length=length)
    if count[0] == 0:
        raise TokenizerError("no training text: the inputs contain no documents")
    for i, special in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(special) != i:
            raise TokenizerError(f"special token {special!r} got id {tok.token_to_id(special)}, expected {i}")
    return save_tokenizer(tok, out, model_max_length=model_max_length, overwrite=overwrite)


def _check_out(out: Path, overwrite: bool) -> None:
    check_output_folder(out, replace=overwrite, how_to_replace="overwrite=True / --force")


def save_tokenizer(tok, out_dir: str | os.PathLike, *, model_max_length: int = 2048, overwrite: bool = False) -> Path:
    """Save a ``tokenizers.Tokenizer`` as a ``transformers``-loadable folder, atomically: the files
    are written and fsynced in a temporary folder beside ``out_dir``, which is then renamed
    (`new_folder`: one writer at a time). A full disk raises `DiskFullError` (the path, the bytes
    needed) and leaves nothing behind."""
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    _check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    # tokenizer.json (pretty-printed, as saved) plus a margin for the small config files
    needed = len(tok.to_str(pretty=True).encode("utf-8")) + (1 << 16)
    check_free_space(out, needed, "needed to save the tokenizer")
    try:
        with new_folder(out) as tmp:
            hf.save_pretrained(str(tmp))
            # transformers 5 keeps the template in chat_template.jinja; also record it (and the
            # special-token ids) in tokenizer_config.json so older loaders (transformers 4, vLLM) see it.
            cfg_path = tmp / "tokenizer_config.json"
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            cfg.update(
                tokenizer_class="PreTrainedTokenizerFast",
                chat_template=CHAT_TEMPLATE,
                add_bos_token=False,
                add_eos_token=False,
                bos_token_id=BOS_ID,
                eos_token_id=EOS_ID,
                pad_token_id=PAD_ID,
                unk_token_id=UNK_ID,
            )
            write_json_atomic(cfg_path, cfg, sort_keys=True)
            _check_out(out, overwrite)  # again: another process may have written it meanwhile
    except BaseException as err:  # the swap fsyncs the files first: a full disk can surface only there
        if is_disk_full(err) and not isinstance(err, DiskFullError):
            raise DiskFullError(out, needed) from None
        raise
    return out


def _tokenizer_json_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise TokenizerError(f"{path}: no tokenizer.json found (train one with `complexity tokenizer train`)")
    return p


def load_tokenizer(path: str | os.PathLike):
    """Load the fast ``tokenizers.Tokenizer`` from a tokenizer folder or a tokenizer.json file."""
    from tokenizers import Tokenizer

    p = _tokenizer_json_path(path)
    try:
        return Tokenizer.from_file(str(p))
    except Exception as err:  # the Rust side raises a generic Exception
        raise TokenizerError(f"{p}: cannot load tokenizer: {err}") from err


def tokenizer_hash(path: str | os.PathLike) -> str:
    """A sha256 over what decides token ids: model (vocab, merges), normaliser, pre-tokeniser and
    added tokens. Cosmetic re-saves (e.g. by ``transformers``) keep the same hash."""
    p = _tokenizer_json_path(path)
    # The parse builds one small list per merge (32k for a 32k vocabulary); with the collector on,
    # that sets off full collections over the whole heap (large once torch is imported), which
    # cost more than the hash itself. The parse makes no reference cycles, so they find nothing.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        spec = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(f"{p}: not a valid tokenizer.json: {err}") from err
    finally:
        if was_enabled:
            gc.enable()
    tokens = (spec.get("added_tokens") or []) if isinstance(spec, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, dict) for t in tokens):
        raise TokenizerError(f"{p}: not a valid tokenizer.json: expected a JSON object whose added_tokens are objects")
    added = sorted((t.get("id"), t.get("content")) for t in tokens)
    canonical = {
        "model": spec.get("model"),
        "normalizer": spec.get("normalizer"),
        "pre_tokenizer": spec.get("pre_tokenizer"),
        "added_tokens": added,
    }
    blob = json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def vocab_size_of(tok) -> int:
    """Number of ids a tokenizer can emit (including added/special tokens)."""
    return int(tok.get_vocab_size(with_added_tokens=True))
