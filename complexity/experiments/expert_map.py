"""A routed run's expert map: held-out tokens run once through the run's final model, right after
training, and kept in RUN/expert_map.npz, so that experts.png is drawn from the run folder alone.

An ablation too long for one machine session is trained in pieces and its report assembled
elsewhere from the runs' small files (metrics, summaries); the weights stay behind. So the file
keeps what the figure draws, not the model's activations: each token's id and expert (the
primary route in the last layer), the 2-D PCA coordinates of its final hidden state and of its
input embedding, and for token- and hash-routed arms the (last layer's) routing table over the
vocabulary and each expert's share of the training split's token frequency mass under it. About
100 KB.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..data.files import FileFormatError
from ..train.durable import write_atomic

MAP_TOKENS = 3000  # held-out tokens drawn in the 2-D maps
FILE = "expert_map.npz"


class ExpertMap(NamedTuple):
    ids: np.ndarray  # (n,) token ids
    experts: np.ndarray  # (n,) the expert each token went to in the last layer (its primary route)
    hidden_2d: np.ndarray  # (n, 2) PCA of the final hidden states
    embeddings_2d: np.ndarray  # (n, 2) PCA of the input embeddings
    # the routing table: (V,) for a token-routed arm, (k, V) for a hash-routed one (the last layer's
    # k routes of every token id); None for a learned router
    token_to_expert: np.ndarray | None
    training_mass: np.ndarray | None  # (E,) each expert's share of the training tokens' routes under that table


def pca_2d(x: np.ndarray) -> np.ndarray:
    """The first two principal components' coordinates of the rows of x (float64)."""
    centered = x.astype(np.float64) - x.mean(axis=0, dtype=np.float64)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    return centered @ vt[:2].T


REMEDY = (
    "delete it: the report writes it again from the run's weights if they are still there, and otherwise "
    "draws that run's expert shares without the maps"
)
_REQUIRED = ("ids", "experts", "hidden_2d", "embeddings_2d")  # token_to_expert, training_mass: optional


def read_expert_map(run_dir: Path) -> ExpertMap | None:
    """The run's expert_map.npz (None: the run has none). A damaged one is a FileFormatError that
    names the file, the problem and what to do."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return None
    try:
        with np.load(path) as f:
            arrays = {name: f[name] for name in ExpertMap._fields if name in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise FileFormatError(f"{path}: unreadable ({type(e).__name__}: {e}); {REMEDY}") from None
    missing = [name for name in _REQUIRED if name not in arrays]
    n = len(arrays["ids"]) if "ids" in arrays else None
    if missing:
        problem = f"missing {', '.join(missing)}"
    elif any(len(arrays[k]) != n for k in _REQUIRED) or any(arrays[k].shape[1:] != (2,) for k in _REQUIRED[2:]):
        problem = "its arrays disagree in length, or the coordinates are not (n, 2)"
    else:
        problem = None
    for name in ("token_to_expert", "training_mass"):  # stored empty when the arm has none
        arrays[name] = arrays[name] if arrays.get(name) is not None and arrays[name].size else None
    table = arrays["token_to_expert"]
    if problem is None and table is not None:
        if table.ndim not in (1, 2):
            problem = f"token_to_expert has shape {list(table.shape)}, expected (V,) or (k, V)"
        elif n and not 0 <= arrays["ids"].min() <= arrays["ids"].max() < table.shape[-1]:
            problem = f"token ids outside the routing table's vocabulary [0, {table.shape[-1]})"
    if problem:
        raise FileFormatError(f"{path}: {problem}; {REMEDY}")
    return ExpertMap(**arrays)


def training_mass(table: np.ndarray, data: str, manifest: dict, n_experts: int) -> np.ndarray | None:
    """Each expert's share of the training split's token frequency mass under the routing table,
    (V,) or (k, V): with k routes a token counts once in each (None: the split has no tokens)."""
    from ..train.data import zipf_counts

    table = np.atleast_2d(table)
    counts, _ = zipf_counts(data, manifest, table.shape[1], 0, 1)
    if counts.sum() == 0:
        return None
    weights = np.tile(counts[: table.shape[1]].astype(np.float64), table.shape[0])
    mass = np.bincount(table.reshape(-1), weights=weights, minlength=n_experts)
    return mass / mass.sum()


def routing_table(model) -> np.ndarray | None:
    """The table the figure draws: the model's token-to-expert table (V,), else the last
    hash-routed layer's routes (k, V); None for a learned router."""
    from ..modeling_complexity import ComplexityHashRoutedMLP

    table = getattr(model.model, "token_to_expert", None)
    if table is None:
        hashed = [m for m in model.modules() if isinstance(m, ComplexityHashRoutedMLP)]
        table = hashed[-1].route_table if hashed else None
    return table.cpu().numpy() if table is not None else None


def final_model_dir(run_dir: Path) -> Path | None:
    """Where the run's final weights are (its final/ export, else its checkpoints); None: gone."""
    run_dir = Path(run_dir)
    if (run_dir / "final" / "config.json").is_file():
        return run_dir / "final"
    if (run_dir / "checkpoints").is_dir():
        return run_dir
    return None


def write_expert_map(run_dir: Path, data: str, seq_len: int, n_tokens: int = MAP_TOKENS) -> ExpertMap | None:
    """Run `n_tokens` held-out tokens of `data` through the run's final model and keep the map in
    RUN/expert_map.npz. None (and no file): the weights or the prepared data are not here, or the
    held-out split is empty."""
    import torch

    from ..data.loader import EvalLoader
    from ..data.manifest import read_prepared_manifest
    from ..modeling_complexity import ComplexityExperts
    from ..train.eval import load_for_eval

    src = final_model_dir(run_dir)
    if src is None:
        return None
    try:
        manifest = read_prepared_manifest(data)
    except FileNotFoundError:
        return None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_for_eval(src, device)
    model.eval()
    banks = [m for m in model.modules() if isinstance(m, ComplexityExperts)]
    captured = []
    # the expert of each token: a routed bank gets one id per row; the hash-routed bank gets each
    # token's k routes, of which the primary (slot 0) colours the token
    handle = banks[-1].register_forward_pre_hook(
        lambda mod, args: captured.append((args[1][:, 0] if args[1].dim() == 2 else args[1]).detach().reshape(-1))
    )
    batch_size = max(1, min(4, -(-n_tokens // seq_len)))
    loader = EvalLoader(data, batch_size=batch_size, seq_len=seq_len, split="val", vocab_size=model.config.vocab_size)
    ids_all, hid_all, emb_all = [], [], []
    n = 0
    try:
        with torch.no_grad():
            for batch in loader:
                ids = batch["input_ids"].to(device)
                outputs = model(input_ids=ids, use_cache=False, output_hidden_states=True)
                ids_all.append(ids.reshape(-1).cpu())
                hid_all.append(outputs.hidden_states[-1].reshape(-1, model.config.hidden_size).float().cpu())
                emb_all.append(model.get_input_embeddings()(ids).reshape(-1, model.config.hidden_size).float().cpu())
                n += ids.numel()
                if n >= n_tokens:
                    break
    finally:
        handle.remove()
    table = routing_table(model)
    n_experts = model.config.num_experts
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not ids_all:
        return None
    ids = torch.cat(ids_all)[:n_tokens]
    emap = ExpertMap(
        ids=ids.numpy().astype(np.int32),
        experts=torch.cat(captured)[: ids.numel()].cpu().numpy().astype(np.int16),
        hidden_2d=pca_2d(torch.cat(hid_all)[:n_tokens].numpy()).astype(np.float32),
        embeddings_2d=pca_2d(torch.cat(emb_all)[:n_tokens].numpy()).astype(np.float32),
        token_to_expert=table.astype(np.int16) if table is not None else None,
        training_mass=training_mass(table, data, manifest, n_experts) if table is not None else None,
    )
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: np.zeros(0) if v is None else v for k, v in emap._asdict().items()})
    write_atomic(Path(run_dir) / FILE, buf.getvalue())
    return emap
