"""lm-evaluation-harness tasks on a Complexity checkpoint (optional: `pip install lm-eval==0.4.13
accelerate`; the harness's Hugging Face model class needs accelerate).

    from complexity.experiments.lm_eval_bridge import run_lm_eval
    run_lm_eval("runs/tiny/final", ["hellaswag"], limit=100)                 # a harness task
    run_lm_eval("runs/tiny/final", ["my_task"], include_path="tasks/")       # a local YAML task

The model goes through the harness's own `HFLM` class, given our model object and tokenizer
(`HFLM(pretrained=model, tokenizer=tok)`), so every harness task type works: loglikelihood
(multiple choice), loglikelihood_rolling (perplexity, bits per byte) and generate_until.

A checkpoint is a Hugging Face folder (e.g. RUN/final), a run folder (its final/ export when it
has one, else its latest training checkpoint) or a training checkpoint folder; the tokenizer is
the one in the folder, else the one the run's data was prepared with. Harness tasks that fetch
their data from the Hugging Face hub need network access; a local task (YAML with
`dataset_path: json` and `dataset_kwargs.data_files`) does not.
"""

from __future__ import annotations

import math
from pathlib import Path


class LmEvalMissing(ImportError):
    pass


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (needs accelerate)
    except ImportError as err:
        raise LmEvalMissing(
            f"lm-evaluation-harness is not usable ({err}); install it with: pip install lm-eval==0.4.13 accelerate"
        ) from err


def _resolve(checkpoint: str | Path) -> tuple[Path, Path | None]:
    """(what to load the model from, the tokenizer folder)."""
    ckpt = Path(checkpoint)
    if not ckpt.exists():
        raise FileNotFoundError(f"checkpoint {str(ckpt)!r} does not exist")
    if not (ckpt / "config.json").is_file() and (ckpt / "final" / "config.json").is_file():
        ckpt = ckpt / "final"
    if (ckpt / "tokenizer.json").is_file() or (ckpt / "tokenizer_config.json").is_file():
        return ckpt, ckpt
    # A training checkpoint: the tokenizer of the data the run trained on.
    from ..data.manifest import read_prepared_manifest, tokenizer_dir
    from ..train.checkpoint import read_meta, resolve_checkpoint

    try:
        meta = read_meta(resolve_checkpoint(ckpt))
        data = meta["config"]["data"]["path"]
        tok = tokenizer_dir(read_prepared_manifest(data)) if data else None
    except (FileNotFoundError, KeyError, ValueError):
        tok = None
    return ckpt, tok


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    try:
        return value.item()  # numpy / torch scalars
    except (AttributeError, ValueError):
        return str(value)


def run_lm_eval(
    checkpoint: str | Path,
    tasks,
    *,
    include_path: str | Path | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    device: str = "auto",
    max_length: int | None = None,
    seed: int = 0,
) -> dict:
    """Run lm-evaluation-harness `tasks` (names, or dicts/Task objects) on `checkpoint`.

    include_path: a folder (or YAML file) of extra task definitions. limit: at most this many
    documents per task (a float < 1: that fraction). Returns {"results": {task: {metric: value}},
    "versions", "n_samples", "config"} (JSON-serialisable)."""
    _require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from ..runtime import resolve_device
    from ..train.eval import load_for_eval

    if isinstance(limit, float) and limit >= 1 and limit.is_integer():
        limit = int(limit)  # a count, not a fraction
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    tasks = list(tasks)
    if not tasks:
        raise ValueError("lm-eval: no tasks given")
    dev = resolve_device(device)
    source, tok_dir = _resolve(checkpoint)
    if tok_dir is None:
        raise FileNotFoundError(f"{checkpoint}: no tokenizer found (neither in the folder nor in the run's data)")
    model, info = load_for_eval(source, dev)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    max_length = max_length or info.get("seq_len") or min(model.config.max_position_embeddings, 2048)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)

    task_manager = None
    if include_path is not None:
        include_path = str(include_path)
        # Only our tasks: indexing the harness's thousands of task files is slow; fall back to all.
        task_manager = TaskManager(include_path=include_path, include_defaults=False)
        names = [t for t in tasks if isinstance(t, str)]
        if any(n not in task_manager.all_tasks for n in names):
            task_manager = TaskManager(include_path=include_path)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=task_manager,
        log_samples=False,
        bootstrap_iters=0,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if out is None:  # non-zero ranks under torchrun
        return {}
    return _json_safe(
        {
            "results": out.get("results", {}),
            "versions": out.get("versions", {}),
            "n_samples": out.get("n-samples", {}),
            "config": {
                "checkpoint": str(source),
                "tokenizer": str(tok_dir),
                "limit": limit,
                "batch_size": batch_size,
                "num_fewshot": num_fewshot,
                "max_length": max_length,
            },
        }
    )
