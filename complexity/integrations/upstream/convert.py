"""Conversion: a validated upstream checkpoint -> a `ComplexityForCausalLM`, and on disk our HF folder.

DST is written into a temporary folder beside it and renamed at the end, so a failure leaves no
DST behind; the written folder is loaded back and compared tensor by tensor before the rename.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ...configuration_complexity import ComplexityConfig
from ...data.files import check_output_folder, new_folder
from ...hash_routing import slot_weights
from ...modeling_complexity import ComplexityForCausalLM
from ...params import ParameterCount, count_parameters
from ...runtime import hf_progress_bars_off, parse_dtype
from .detect import UpstreamCheckpoint, detect_upstream
from .formats import UpstreamFormatError
from .readers import TOKENIZER_FILES


@dataclass
class ConversionReport:
    design: str
    src: Path
    dst: Path | None
    weights_file: Path
    config: ComplexityConfig
    mapped: int
    dropped: list[tuple[str, str]]
    notes: list[str]
    ignored_config_fields: list[str]
    copied_files: list[str]
    parameters: ParameterCount
    dtype: str

    def __str__(self) -> str:
        c = self.config
        lines = [
            f"detected: {self.notes[0]}",
            f"  source: {self.weights_file}",
            *(f"  {n}" for n in self.notes[1:]),
            f"  config: vocab {c.vocab_size}, hidden {c.hidden_size}, layers {c.num_hidden_layers}, "
            f"heads {c.num_attention_heads} (kv {c.num_key_value_heads}), experts {c.num_experts} x {c.expert_width}"
            + (f", shared expert {c.shared_expert_width}" if c.shared_expert else "")
            + f", mu_mode {c.mu_mode}, {_routing(c)}, qk_norm {c.use_qk_norm}, "
            f"tie_word_embeddings {c.tie_word_embeddings}, dtype {self.dtype}",
            f"  mapped {self.mapped} tensor(s); dropped {len(self.dropped)}" + (":" if self.dropped else ""),
        ]
        by_reason: dict[str, list[str]] = {}
        for key, reason in self.dropped:
            by_reason.setdefault(reason, []).append(key)
        for reason, keys in by_reason.items():
            shown = ", ".join(keys[:3]) + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")
            lines.append(f"    {shown}: {reason}")
        if self.ignored_config_fields:
            lines.append("  config fields without effect on the computation: " + "; ".join(self.ignored_config_fields))
        if self.copied_files:
            lines.append(f"  copied: {', '.join(self.copied_files)}")
        lines.append(f"  parameters: {self.parameters}")
        if self.dst is not None:
            lines.append(f"wrote {self.dst}")
        return "\n".join(lines)


def _routing(c: ComplexityConfig) -> str:
    if c.mlp_type != "hash_routed":
        return f"routing {c.routing}"
    return (
        f"hash routing top-{c.num_experts_per_tok} ({c.route_strategy}, slot weights "
        f"{', '.join(f'{w:g}' for w in slot_weights(c.num_experts_per_tok, c.route_primary_weight))})"
    )


def load_upstream(src, *, dtype=None) -> tuple[ComplexityForCausalLM, UpstreamCheckpoint, list[tuple[str, str]]]:
    """An upstream checkpoint as a ready `ComplexityForCausalLM` (eval mode), with the detection
    result and the dropped keys. Strict: every parameter and buffer comes from the file.
    `dtype` (a name or torch.dtype) casts the floating tensors; None keeps the file's."""
    dtype = None if dtype is None else parse_dtype(dtype)
    ckpt = detect_upstream(src)
    adapter = ckpt.adapter()
    sd = adapter.to_complexity(ckpt.state_dict)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    sd = {k: v.contiguous() for k, v in sd.items()}
    with torch.device("meta"):
        model = ComplexityForCausalLM(ckpt.config)
    expected = set(model.state_dict())
    if ckpt.config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:  # the detection step should make this impossible
        raise UpstreamFormatError(src, [f"internal mapping error: missing {missing}, unexpected {unexpected}"])
    model.load_state_dict(sd, strict=False, assign=True)
    if ckpt.config.tie_word_embeddings:
        model.tie_weights()
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise UpstreamFormatError(src, [f"internal mapping error: not loaded: {leftover}"])
    return model.eval(), ckpt, adapter.dropped


def inspect_upstream(src, *, dtype=None) -> ConversionReport:
    """Everything `convert_upstream` checks and reports, without writing anything (a dry run)."""
    model, ckpt, dropped = load_upstream(src, dtype=dtype)
    return _make_report(model, ckpt, dropped, None, [])


def convert_upstream(src, dst, *, dtype=None, overwrite: bool = False, verify: bool = True) -> ConversionReport:
    """Convert an upstream checkpoint folder SRC (complexity-deep 0.13 / 1.0, or TR-Hash MoE in any
    of its four layouts) into our Hugging Face folder DST.

    DST is written into a temporary folder beside it and renamed at the end, so a failure leaves
    no DST behind. An existing non-empty DST is refused unless ``overwrite``. With ``verify`` the
    written folder is loaded back with ``from_pretrained`` and compared tensor by tensor.
    """
    src, dst = Path(src), Path(dst)
    _check_destination(src, dst, overwrite)
    model, ckpt, dropped = load_upstream(src, dtype=dtype)
    counts = count_parameters(model)

    created = _missing_parents(dst)
    try:
        with new_folder(dst) as tmp:
            with hf_progress_bars_off():
                model.save_pretrained(tmp, safe_serialization=True)
            copied = _copy_tokenizer(src, tmp)
            if verify:
                _verify_written(tmp, model)
    except BaseException:
        for path in created:  # innermost first
            try:
                path.rmdir()
            except OSError:
                break
        raise
    return _make_report(model, ckpt, dropped, dst, copied, counts)


def _copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy SRC's tokenizer files, when SRC has a tokenizer: a tokenizer_config.json alone (an
    upstream hf bundle carries one with the special-token ids only) is no tokenizer, and a folder
    holding it without tokenizer.json would not load."""
    if not any((src / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return []
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def _check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    check_output_folder(dst, replace=overwrite, how_to_replace="overwrite=True / --overwrite")
    if src.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: DST must differ from SRC")


def _missing_parents(dst: Path) -> list[Path]:
    """DST's parent folders that do not exist yet, innermost first (removed again on failure)."""
    created, parent = [], dst.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    return created


def _verify_written(folder: Path, model: ComplexityForCausalLM) -> None:
    """Load the written folder back and require every tensor to come back bit for bit."""
    with hf_progress_bars_off():
        loaded, info = ComplexityForCausalLM.from_pretrained(folder, output_loading_info=True, dtype="auto")
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise UpstreamFormatError(folder, [f"written checkpoint does not load cleanly: {bad}"])
    want, got = model.state_dict(), loaded.state_dict()
    differ = [k for k in want if k not in got or got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    if differ:
        raise UpstreamFormatError(folder, [f"written checkpoint differs after reloading: {differ}"])


def _make_report(model, ckpt: UpstreamCheckpoint, dropped, dst, copied, counts=None) -> ConversionReport:
    state = model.state_dict()
    return ConversionReport(
        design=ckpt.design,
        src=ckpt.src,
        dst=dst,
        weights_file=ckpt.weights_file,
        config=ckpt.config,
        mapped=len(state) - (1 if ckpt.config.tie_word_embeddings else 0),
        dropped=dropped,
        notes=ckpt.notes,
        ignored_config_fields=ckpt.ignored_config_fields,
        copied_files=copied,
        parameters=counts or count_parameters(model),
        dtype="/".join(sorted({str(t.dtype).removeprefix("torch.") for t in state.values() if t.is_floating_point()})),
    )
