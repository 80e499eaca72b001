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


def _resolve(checkpoint: str | Path) -> tuple[Path, Path]:
    """(what to load the model from, the tokenizer folder)."""
    ckpt = Path(checkpoint)
    if not ckpt.exists():
        raise FileNotFoundError(f"checkpoint {str(ckpt)!r} does not exist")
    if not (ckpt / "config.json").is_file() and (ckpt / "final" / "config.json").is_file():
        ckpt = ckpt / "final"
    if (ckpt / "tokenizer.json").is_file() or (ckpt / "tokenizer_config.json").is_file():
        return ckpt, ckpt
    tok = _training_data_tokenizer(ckpt)
    if tok is None:
        raise FileNotFoundError(f"{checkpoint}: no tokenizer found (neither in the folder nor in the run's data)")
    return ckpt, tok


def _training_data_tokenizer(ckpt: Path) -> Path | None:
    """The tokenizer of the data a training checkpoint trained on, if it can be found."""
    from ..data.manifest import read_prepared_manifest, tokenizer_dir
    from ..train.checkpoint import read_meta, resolve_checkpoint

    try:
        meta = read_meta(resolve_checkpoint(ckpt))
        data = meta["config"]["data"]["path"]
        return tokenizer_dir(read_prepared_manifest(data)) if data else None
    except (FileNotFoundError, KeyError, ValueError):
        return None


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

    from ..runtime import resolve_device

    if isinstance(limit, float) and limit >= 1 and limit.is_integer():
        limit = int(limit)  # a count, not a fraction
    tasks = _task_list(tasks)
    dev = resolve_device(device)
    source, tok_dir = _resolve(checkpoint)
    lm, max_length = _harness_model(source, tok_dir, dev, batch_size=batch_size, max_length=max_length)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=_task_manager(include_path, tasks),
        log_samples=False,
        bootstrap_iters=0,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if out is None:  # non-zero ranks under torchrun
        return {}
    settings = dict(limit=limit, batch_size=batch_size, num_fewshot=num_fewshot, max_length=max_length)
    return _json_safe(
        {
            "results": out.get("results", {}),
            "versions": out.get("versions", {}),
            "n_samples": out.get("n-samples", {}),
            "config": {"checkpoint": str(source), "tokenizer": str(tok_dir), **settings},
        }
    )


def _task_list(tasks) -> list:
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    tasks = list(tasks)
    if not tasks:
        raise ValueError("lm-eval: no tasks given")
    return tasks


def _harness_model(source: Path, tok_dir: Path, device, *, batch_size: int, max_length: int | None):
    """(the harness's HFLM wrapping our model and tokenizer, the context length it scores with)."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from ..train.eval import load_for_eval

    model, info = load_for_eval(source, device)
    model.eval()  # load_for_eval leaves a training checkpoint's model in training mode
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    # The run's training length, else the model's, capped at the harness's own default.
    max_length = max_length or info.get("seq_len") or min(model.config.max_position_embeddings, 2048)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length), max_length


def _task_manager(include_path: str | Path | None, tasks: list):
    """None (the harness's own tasks) without include_path."""
    if include_path is None:
        return None
    from lm_eval.tasks import TaskManager

    include_path = str(include_path)
    # Only our tasks: indexing the harness's thousands of task files is slow; fall back to all.
    task_manager = TaskManager(include_path=include_path, include_defaults=False)
    if all(t in task_manager.all_tasks for t in tasks if isinstance(t, str)):
        return task_manager
    return TaskManager(include_path=include_path)
