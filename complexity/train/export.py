"""OUT/final: the trained model as a Hugging Face folder (safetensors + config + the model's code
files + the run's tokenizer copy), loadable with `AutoModelForCausalLM.from_pretrained`.

Written into `.final.tmp`, fsynced, then swapped in with `durable.replace_dir` (an existing
export stays whole until the new one is in place). A full disk is refused before writing when
the weights alone would not fit, and raises `complexity.data.files.DiskFullError` (the path, the
bytes) if a write still fails; the training
checkpoints are untouched either way, and `--resume` then exports again.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..data.files import DiskFullError, free_bytes
from .checkpoint import full_model_state_dict
from .durable import caused_by_full_disk, replace_dir
from .parallelize import barrier

INTACT = "the training checkpoints are intact: free some space and run again with --resume to export"


def export_hf(model: torch.nn.Module, model_config, out_dir: Path, tokenizer: Path | None, is_main: bool) -> Path:
    """Collective (the full state is gathered from every rank); rank 0 writes OUT/final."""
    from ..modeling_complexity import ComplexityForCausalLM

    state = full_model_state_dict(model)
    final = out_dir / "final"
    if is_main:
        needed = sum(t.numel() * t.element_size() for t in state.values()) + 16 * 2**20
        if tokenizer is not None:
            needed += sum(f.stat().st_size for f in tokenizer.iterdir() if f.is_file())
        free = free_bytes(out_dir)
        if free is not None and needed > free:
            raise DiskFullError(final, needed, free=free, hint=f"not exported; {INTACT}")
        with torch.device("meta"):
            export_model = ComplexityForCausalLM(model_config)
        export_model.load_state_dict(state, strict=False, assign=True)
        export_model.tie_weights()
        missing = [n for n, p in export_model.named_parameters() if p.is_meta] + [
            n for n, b in export_model.named_buffers() if b.is_meta
        ]
        if missing:
            raise RuntimeError(f"export: weights missing from the state dict: {missing[:5]}")
        tmp = out_dir / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            export_model.save_pretrained(tmp)
            for f in tokenizer.iterdir() if tokenizer is not None else ():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
            replace_dir(tmp, final, "export")
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if caused_by_full_disk(err):
                raise DiskFullError(final, needed, hint=f"not exported; {INTACT}") from None
            raise
    barrier()
    return final
