"""Held-out evaluation: loss, perplexity, bits per byte, per-expert token shares.

    val_loss = total nats / evaluated tokens           val_ppl = exp(val_loss)
    val_bpb  = total nats / ln 2 / evaluated UTF-8 bytes

The data manifest records the UTF-8 bytes of each split's text (`splits.val.text_bytes`) and
its token count. We evaluate fixed windows of the val stream (at most `max_batches` batches),
so the evaluated bytes are the split's bytes scaled by the evaluated fraction of its tokens:
`bytes = text_bytes * evaluated_tokens / split_tokens` (the split's mean bytes per token; exact
when the whole split is evaluated, up to the < seq_len tokens of the last partial window).
Each predicted token counts once; the document-separator `</s>` tokens are predicted too.

Expert shares come from the model's actual routing: a forward pre-hook on every expert bank
(`ComplexityExperts`) counts the expert ids it receives, so they are exact for token_routed
(table lookup), for INL (after the mu-router override) and for learned_moe (router top-k
choices; shares of assignments). `expert_shares` averages the layers; `expert_shares_per_layer`
lists them.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import manifest as data_manifest
from ..modeling_complexity import ComplexityExperts
from . import data as data_mod
from .parallelize import all_reduce_


@contextlib.contextmanager
def count_expert_tokens(model: torch.nn.Module):
    """Yields a list of per-layer count tensors (or [] for dense models), filled by forward passes."""
    banks = [m for m in model.modules() if isinstance(m, ComplexityExperts)]
    counts = [None] * len(banks)
    handles = []
    for i, bank in enumerate(banks):

        def hook(module, args, i=i):
            ids = args[1].detach().reshape(-1)
            c = torch.bincount(ids, minlength=module.num_experts).to(torch.float64)
            counts[i] = c if counts[i] is None else counts[i] + c

        handles.append(bank.register_forward_pre_hook(hook))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches,
    *,
    device: torch.device,
    vocab_size: int,
    autocast_dtype: torch.dtype | None = None,
    max_batches: int | None = None,
    split_tokens: int | None = None,
    split_bytes: int | None = None,
    expert_shares: bool = True,
    forward=None,
) -> dict:
    """Evaluate over `batches` (dicts with input_ids/labels). Collective when distributed (sums
    are all-reduced; every rank must call it). `forward` is the callable to run (default `model`,
    e.g. a DDP wrapper)."""
    forward = forward or model
    was_training = model.training
    model.eval()
    nats = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    ctx = count_expert_tokens(model) if expert_shares else contextlib.nullcontext([])
    with ctx as counts:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            ids = batch["input_ids"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
            with amp:
                logits = forward(input_ids=ids, use_cache=False).logits
            loss = F.cross_entropy(
                logits.float().reshape(-1, vocab_size), labels.reshape(-1), reduction="sum", ignore_index=-100
            )
            nats += loss.double()
            tokens += (labels != -100).sum().double()
    all_reduce_(nats)
    all_reduce_(tokens)
    model.train(was_training)
    n_tok = tokens.item()
    total = nats.item()
    result = {"val_tokens": int(n_tok)}
    if n_tok == 0:
        raise ValueError("evaluation: the validation split has no full window of seq_len + 1 tokens")
    result["val_loss"] = total / n_tok
    result["val_ppl"] = math.exp(min(result["val_loss"], 700.0))
    if split_tokens and split_bytes:
        evaluated_bytes = split_bytes * n_tok / split_tokens
        result["val_bytes"] = evaluated_bytes
        result["val_bpb"] = total / math.log(2) / evaluated_bytes
    layer_counts = [c for c in counts if c is not None]
    if layer_counts:
        stacked = torch.stack([c.to(device) for c in layer_counts])
        all_reduce_(stacked)
        per_layer = stacked / stacked.sum(-1, keepdim=True).clamp(min=1)
        result["expert_shares"] = [round(x, 6) for x in per_layer.mean(0).tolist()]
        result["expert_shares_per_layer"] = [[round(x, 6) for x in row] for row in per_layer.tolist()]
    return result


def load_for_eval(ckpt: str | Path, device: torch.device, check=None):
    """An evaluation model from a Hugging Face folder (e.g. OUT/final) or a training checkpoint
    (a step_* folder, a run's checkpoints/ folder, or a run folder). Returns (model, info).
    ``check(config, info)`` runs before any weight is read (info: "tokenizer", the folder whose
    tokenizer.json the model came with, or "data", the data a training checkpoint trained on)."""
    from ..checkpoint_folder import check_tokenizer_json, load_checkpoint_folder
    from ..modeling_complexity import ComplexityForCausalLM
    from .checkpoint import load_model_weights, read_meta, resolve_checkpoint
    from .config import RunConfig

    ckpt = Path(ckpt)
    training = (
        ckpt.is_dir()
        and not (ckpt / "config.json").exists()
        and ((ckpt / "meta.json").exists() or (ckpt / "checkpoints").is_dir() or any(ckpt.glob("step_*")))
    )
    if not training:  # a Hugging Face folder, every file checked (complexity.checkpoint_folder)
        tokenizer = str(ckpt) if (ckpt / "tokenizer.json").is_file() else None
        info = {"source": "hf", "path": str(ckpt), "seq_len": None, "tokenizer": tokenizer}

        def check_folder(config):
            if tokenizer is not None:  # a broken one is named, not compared by its hash with the data's
                check_tokenizer_json(ckpt)
            if check is not None:
                check(config, info)

        model, _ = load_checkpoint_folder(ckpt, device=device, dtype=torch.float32, tokenizer=False, check=check_folder)
        return model, info
    path = resolve_checkpoint(ckpt)
    meta = read_meta(path)
    config = RunConfig.from_dict(meta["config"], where=f"{path}/meta.json")
    info = {
        "source": "checkpoint",
        "path": str(path),
        "step": meta["step"],
        "seq_len": config.training.seq_len,
        "data": config.data.path,
    }
    model = ComplexityForCausalLM(config.model.build())
    if check is not None:
        check(model.config, info)
    load_model_weights(path, model)
    return model.to(device), info


def evaluate_checkpoint(
    ckpt: str | Path,
    data: str | Path,
    *,
    max_batches: int | None = None,
    batch_size: int = 8,
    seq_len: int | None = None,
    device: str = "auto",
) -> dict:
    """The `complexity eval` library function: held-out metrics of a checkpoint on a prepared
    folder's val split. Checks the data against the model's vocabulary and tokenizer before any
    weight is loaded."""
    from .parallelize import resolve_device

    dev = torch.device(resolve_device(device))
    manifest = data_manifest.read_prepared_manifest(data)

    def check(config, info):
        nonlocal seq_len
        data_manifest.check_data_matches_model(manifest, config.vocab_size, data)
        if info.get("tokenizer"):  # an HF folder carries its tokenizer: the data must come from it
            data_manifest.check_compatible(manifest, data, tokenizer=info["tokenizer"])
        elif info.get("data"):  # a training checkpoint: the tokenizer of the data it was trained on
            data_manifest.check_same_run_tokenizer(manifest, data, info["data"], info["path"])
        seq_len = seq_len or info.get("seq_len") or min(config.max_position_embeddings, 2048)
        if data_manifest.split_tokens(manifest, "val") < seq_len + 1:
            raise ValueError(
                f"data {str(data)!r}: the val split has {data_manifest.split_tokens(manifest, 'val')} "
                f"tokens, fewer than one window of seq_len + 1 = {seq_len + 1}"
            )

    model, info = load_for_eval(ckpt, dev, check=check)
    loader = data_mod.make_val_loader(data, batch_size, seq_len, vocab_size=model.config.vocab_size)
    result = evaluate(
        model,
        iter(loader),
        device=dev,
        vocab_size=model.config.vocab_size,
        max_batches=max_batches,
        split_tokens=data_manifest.split_tokens(manifest, "val"),
        split_bytes=data_manifest.split_bytes(manifest, "val"),
    )
    result.update({"checkpoint": info["path"], "data": str(data), "seq_len": seq_len, "batch_size": batch_size})
    if "step" in info:
        result["step"] = info["step"]
    return result
