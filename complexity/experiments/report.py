"""The ablation's report, written from the files in the ablation folder (so it can be redone at
any time: `complexity ablate --report-only --out DIR`):

    results.md   parameter counts, per-arm mean +- std over seeds of the held-out loss and bits
                 per byte at the end, the average training loss over the first K steps (the metric
                 upstream quoted), the final training loss, tokens/s, the exact commands; the
                 spike table when the ablation injected one
    loss.png     training loss (mean over each arm's finished seeds, moving average), held-out
                 loss, and each arm's training-loss gap to the dense arm, paired by seed
                 (negative = lower loss than dense)
    experts.png  routed arms: each expert's share of the vocabulary ids, of the training data's
                 token frequency mass and of the held-out tokens actually routed to it; and a
                 2-D PCA map of final hidden states (and of input embeddings) of held-out tokens,
                 coloured by the expert each token went to (in the last layer), from each run's
                 expert_map.npz (`expert_map`): the weights need not be there
    spike.png    (spike runs) the training loss around the injected step, per arm

Each file is replaced whole or not at all (written under a temporary name, fsynced, renamed:
`durable.write_atomic`, `train.plot.save_figure`), so a kill leaves the previous report.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path

from ..data.files import NUMBER, FileFormatError, check_fields, read_json_object
from ..train.durable import write_atomic
from ..train.metrics import train_losses
from ..train.plot import save_figure
from .expert_map import ExpertMap, read_expert_map, write_expert_map
from .run_files import PLAN_REMEDY, read_done, read_run_metrics, run_name

# The fields of ablation.json the report reads.
_META_FIELDS = {
    "command": str,
    "preset": str,
    "data": str,
    "steps": int,
    "seeds": list,
    "arms": list,
    "avg_k": int,
    "tolerance": NUMBER,
    "reference_arm": str,
    "tokens_per_step": int,
    "seq_len": int,
    "precision": str,
    "compile": object,
    "plan": dict,
}
_PLAN_FIELDS = {"label": str, "model": dict, "total": int, "active": int, "mismatch": NUMBER, "widths": dict}


def _load(out: Path) -> tuple[dict, dict[str, dict], dict[str, list[dict]]]:
    path = out / "ablation.json"
    if not path.is_file():
        raise FileNotFoundError(f"{out}: no ablation.json (not an ablation folder)")
    meta = read_json_object(path, PLAN_REMEDY, _META_FIELDS)
    for arm in meta["arms"]:
        if arm not in meta["plan"]:
            raise FileFormatError(f"{path}: arm {arm!r} has no plan; {PLAN_REMEDY}")
        check_fields(meta["plan"][arm], _PLAN_FIELDS, f"{path}: the plan of arm {arm!r}", PLAN_REMEDY)
    runs, metrics = {}, {}
    for arm in meta["arms"]:
        for seed in meta["seeds"]:
            name = run_name(arm, seed)
            run_dir = out / "runs" / name
            if (run_dir / "done.json").is_file():
                runs[name] = read_done(run_dir)
                metrics[name] = read_run_metrics(run_dir)
    return meta, runs, metrics


def _stats(values: list) -> tuple[float | None, float | None, int]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


def _fmt(values: list, digits: int = 4) -> str:
    mean, std, n = _stats(values)
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _fmt_int(values: list) -> str:
    mean, std, n = _stats(values)
    if mean is None:
        return "n/a"
    return f"{mean:,.0f}" + (f" ± {std:,.0f}" if std is not None else "")


def write_report(out: str | Path, log: Callable[[str], None] | None = None) -> tuple[Path, list[Path]]:
    """results.md and the figures from the ablation folder `out`; returns (results.md, [figures])."""
    out = Path(out)
    log = log or (lambda msg: None)
    meta, runs, metrics = _load(out)
    path = out / "results.md"
    write_atomic(path, results_markdown(meta, runs), "report.results_md")
    figures = [plot_losses(meta, metrics, out / "loss.png")]
    routed = [a for a in meta["arms"] if meta["plan"][a]["model"].get("mlp_type") != "dense"]
    if routed and any(run_name(a, meta["seeds"][0]) in runs for a in routed):
        figures.append(plot_experts(out, meta, runs, out / "experts.png"))
    if meta.get("spike"):
        figures.append(plot_spike(meta, metrics, out / "spike.png"))
    figures = [f for f in figures if f is not None]
    log(f"ablate: wrote {path} and {', '.join(str(f) for f in figures)}")
    return path, figures


# ----------------------------------------------------------------------------- results.md


def results_markdown(meta: dict, runs: dict[str, dict]) -> str:
    """results.md from ablation.json (`meta`) and the finished runs' done.json ("<arm>-s<seed>" ->)."""
    sections = (
        _header(meta),
        _parameters_table(meta),
        _results_table(meta, runs),
        _paired_table(meta, runs),
        _expert_shares_table(meta, runs),
        _spike_table(meta, runs),
        _runs_table(meta, runs),
    )
    return "\n\n".join("\n".join(lines) for lines in sections if lines) + "\n"


def _row(cells) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def _arm_runs(meta: dict, runs: dict[str, dict], arm: str) -> list[dict]:
    """The arm's finished runs, in seed order."""
    return [runs[run_name(arm, s)] for s in meta["seeds"] if run_name(arm, s) in runs]


def _header(meta: dict) -> list[str]:
    tokens = meta["steps"] * meta["tokens_per_step"]
    return [
        f"# Ablation: {meta['preset']}, {meta['steps']} steps x {meta['tokens_per_step']:,} tokens "
        f"({tokens:,} tokens per run), seeds {', '.join(map(str, meta['seeds']))}",
        "",
        "Produced by:",
        "",
        "```",
        meta["command"],
        "```",
        "",
        f"Data: `{meta['data']}`; seq_len {meta['seq_len']}; precision {meta['precision']}; "
        f"compile {str(meta['compile']).lower()}. Every arm trains on the same batches in the same order for a "
        "given seed (the seed also fixes the initialisation).",
    ]


def _parameters_table(meta: dict) -> list[str]:
    plan = meta["plan"]
    ref = plan.get(meta["reference_arm"]) or next(iter(plan.values()))
    lines = [
        "## Parameters (live: tied embedding once, no dead weights)",
        "",
        f"Totals are matched to arm {ref['label'].split(')')[0]})'s {ref['total']:,} by widening the MLP of the "
        f"arms with fewer parameters; tolerance {100 * meta['tolerance']:.1f}% (relative).",
        "",
        "| arm | description | total | active per token | mismatch | MLP widths |",
        "|---|---|---:|---:|---:|---|",
    ]
    for a in meta["arms"]:
        p = plan[a]
        widths = ", ".join(f"{key} {v}" for key, v in p["widths"].items())
        lines.append(
            _row([a, p["label"], f"{p['total']:,}", f"{p['active']:,}", f"{100 * p['mismatch']:+.3f}%", widths])
        )
    return lines


def _results_table(meta: dict, runs: dict[str, dict]) -> list[str]:
    k = meta["avg_k"]
    lines = [
        "## Results (mean ± std over seeds; std needs two or more)",
        "",
        f"val loss / val bpb: held-out loss (nats/token) and bits per UTF-8 byte at the end of training. "
        f"avg train loss: the mean training loss over the first {k} of {meta['steps']} steps (the metric "
        f"upstream quoted, 700 of ~954 steps). final train loss: the mean over the last 5% of steps. "
        f"tokens/s: median step throughput.",
        "",
        f"| arm | description | seeds | val loss | val bpb | avg train loss (first {k} steps) | final train loss | "
        "tokens/s | total params | active params |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a in meta["arms"]:
        rs, p = _arm_runs(meta, runs, a), meta["plan"][a]
        cells = [a, p["label"], len(rs)]
        cells += [
            _fmt([r.get(m) for r in rs]) for m in ("val_loss", "val_bpb", "avg_train_loss_first_k", "final_train_loss")
        ]
        cells += [_fmt_int([r.get("tokens_per_s") for r in rs]), f"{p['total']:,}", f"{p['active']:,}"]
        lines.append(_row(cells))
    missing = [run_name(a, s) for s in meta["seeds"] for a in meta["arms"] if run_name(a, s) not in runs]
    if missing:
        lines += ["", f"Not finished (rerun the command to complete): {', '.join(missing)}."]
    return lines


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (more: the normal's 1.960).
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131)
_T95 += (2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
PAIRED_BASE = "dense"


def _paired(meta: dict, runs: dict[str, dict], arm: str, metric: str) -> list[float]:
    """arm - dense for each seed both finished with a finite value (same seed: same batches)."""
    diffs = []
    for s in meta["seeds"]:
        a, b = runs.get(run_name(arm, s)), runs.get(run_name(PAIRED_BASE, s))
        values = (a or {}).get(metric), (b or {}).get(metric)
        if all(v is not None and math.isfinite(v) for v in values):
            diffs.append(values[0] - values[1])
    return diffs


def _signed(values: list[float]) -> str:
    mean, std, _ = _stats(values)
    if mean is None:
        return "n/a"
    return f"{mean:+.4f}" + (f" ± {std:.4f}" if std is not None else "")


def _paired_table(meta: dict, runs: dict[str, dict]) -> list[str]:
    """Each arm's held-out gap to the dense arm, paired by seed: its mean, spread, 95% interval and
    whether the seeds resolve it (the interval excludes 0). No lines without a dense arm."""
    if PAIRED_BASE not in meta["arms"] or len(meta["arms"]) < 2:
        return []
    lines = [
        "## Paired differences against dense (arm - dense, per seed)",
        "",
        "Same seed: same batches in the same order, same initialisation seed, so each seed gives one "
        "difference. mean ± std over seeds; 95% CI: mean ± t(0.975, n-1) x std / sqrt(n). A gap is resolved "
        "when its interval excludes 0 (the verdict is the same for bits per byte: on one held-out set they "
        "are a fixed multiple of nats). Below 0: lower held-out loss than dense.",
        "",
        "| arm | seeds paired | Δ val loss | 95% CI (Δ val loss) | Δ val bpb | seeds below dense | resolved (95%) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for arm in meta["arms"]:
        if arm == PAIRED_BASE:
            continue
        loss = _paired(meta, runs, arm, "val_loss")
        mean, std, n = _stats(loss)
        if n >= 2:
            half = (_T95[n - 2] if n - 1 <= len(_T95) else 1.960) * std / math.sqrt(n)
            ci = f"[{mean - half:+.4f}, {mean + half:+.4f}]"
            verdict = (
                "no" if mean - half <= 0 <= mean + half else ("yes: below dense" if mean < 0 else "yes: above dense")
            )
        else:
            ci, verdict = "n/a", "n/a (needs two seeds)" if n == 1 else "n/a"
        below = f"{sum(d < 0 for d in loss)}/{n}" if n else "n/a"
        lines.append(_row([arm, n, _signed(loss), ci, _signed(_paired(meta, runs, arm, "val_bpb")), below, verdict]))
    return lines


def _expert_shares_table(meta: dict, runs: dict[str, dict]) -> list[str]:
    """Each routed arm's expert shares of the held-out tokens, for the first seed (none: no lines)."""
    seed = meta["seeds"][0]
    shares = [(a, runs.get(run_name(a, seed), {}).get("expert_shares")) for a in meta["arms"]]
    shares = [(a, s) for a, s in shares if s]
    if not shares:
        return []
    n = max(len(s) for _, s in shares)
    return [
        f"## Expert shares of held-out tokens (seed {seed}, mean over layers)",
        "",
        _row(["arm", *(f"expert {i}" for i in range(n))]),
        "|---|" + "---:|" * n,
        # an arm with fewer experts than the widest gets "-" in the columns it has no expert for
        *(_row([a, *(f"{x:.3f}" for x in s), *["-"] * (n - len(s))]) for a, s in shares),
    ]


def _spike_table(meta: dict, runs: dict[str, dict]) -> list[str]:
    """How each arm took the injected fault (none without --spike: no lines)."""
    spike = meta.get("spike")
    if not spike:
        return []
    lines = [
        f"## Spike at step {spike['step']}",
        "",
        f"Fault: {spike['fault']} (LR x {spike['lr_mult']:g}). pre: mean training loss of the {spike['window']} "
        f"steps before; fault loss: the loss on the corrupted batch; peak: the highest loss on real data after it; "
        f"recovery: steps until the loss is back within 5% of pre (n/a: not within the run).",
        "",
        "| arm | injected at | pre | fault loss | peak | peak / pre | recovery (steps) | not recovered |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for a in meta["arms"]:
        rs = [r["spike"] for r in _arm_runs(meta, runs, a) if "spike" in r]
        at = sorted({st for r in rs for st in r.get("injected_at", [])})
        recovered = [r.get("recovery") for r in rs if r.get("recovery") is not None]
        cells = [a, ", ".join(map(str, at)) or "n/a"]
        cells += [_fmt([r.get(m) for r in rs]) for m in ("pre", "fault_loss", "peak")]
        cells += [
            _fmt([r.get("peak_ratio") for r in rs], 3),
            _fmt(recovered, 1),
            f"{len(rs) - len(recovered)}/{len(rs)}",
        ]
        lines.append(_row(cells))
    return lines


def _runs_table(meta: dict, runs: dict[str, dict]) -> list[str]:
    """The command that trains each finished run alone."""
    note = " (without the spike: its hooks are not part of `complexity train`)" if meta.get("spike") else ""
    lines = [
        "## Runs",
        "",
        "Each run folder holds resolved.json, metrics.jsonl, batches.jsonl (sha1 of every micro-batch), "
        "done.json, checkpoints/ and final/, and for a routed arm expert_map.npz (what experts.png draws). "
        "The same training alone:",
        "",
        "| run | command |",
        "|---|---|",
    ]
    for s in meta["seeds"]:
        for a in meta["arms"]:
            r = runs.get(run_name(a, s))
            if r:
                lines.append(f"| {a}-s{s} | `{r['train_command']}`{note} |")
    return lines


# ----------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: list[float], n: int) -> list[float]:
    out, acc, total = [], [], 0.0
    for v in values:
        acc.append(v)
        total += v
        if len(acc) > n:
            total -= acc.pop(0)
        out.append(total / len(acc))
    return out


def _seed_mean(series: list[dict[int, float]]) -> tuple[list[int], list[float]]:
    if not series:
        return [], []
    steps = sorted(set.intersection(*(set(s) for s in series)))
    return steps, [statistics.fmean(s[t] for s in series) for t in steps]


def _seeds_run(meta: dict, metrics: dict[str, list[dict]], arm: str) -> list[int]:
    return [s for s in meta["seeds"] if run_name(arm, s) in metrics]


def _curves(meta, metrics, arm, seeds=None):
    """(steps, seed-mean training loss), (steps, seed-mean held-out loss) over `seeds` (default:
    the arm's finished ones)."""
    train, val = [], []
    for seed in _seeds_run(meta, metrics, arm) if seeds is None else seeds:
        recs = metrics[run_name(arm, seed)]
        train.append(train_losses(recs))
        val.append({r["step"]: r["val_loss"] for r in recs if r.get("val_loss") is not None})
    return _seed_mean(train), _seed_mean(val)


def training_gap(meta: dict, metrics: dict[str, list[dict]], arm: str, ref: str, smooth: int) -> tuple[list, list]:
    """The arm's smoothed training loss minus the reference arm's, paired by seed: both averaged
    over the seeds both have finished, so an unfinished seed of one arm does not tilt the gap."""
    seeds = [s for s in _seeds_run(meta, metrics, arm) if run_name(ref, s) in metrics]
    if not seeds:
        return [], []
    (steps, loss), _ = _curves(meta, metrics, arm, seeds)
    (ref_steps, ref_loss), _ = _curves(meta, metrics, ref, seeds)
    ref_map = dict(zip(ref_steps, _smooth(ref_loss, smooth)))
    gap = [(t, v - ref_map[t]) for t, v in zip(steps, _smooth(loss, smooth)) if t in ref_map]
    return [t for t, _ in gap], [v for _, v in gap]


def plot_losses(meta: dict, metrics: dict[str, list[dict]], path: Path) -> Path:
    """Each curve is the mean over the arm's finished seeds (the legend says how many); the gap
    panel pairs seeds (`training_gap`)."""
    plt = _plt()
    arms = meta["arms"]
    smooth = max(1, meta["steps"] // 50)
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ref = "dense" if "dense" in arms else arms[0]
    for i, a in enumerate(arms):
        (steps, loss), (vsteps, vloss) = _curves(meta, metrics, a)
        c, n = colors[i % len(colors)], len(_seeds_run(meta, metrics, a))
        label = f"{a} ({n} seed{'s' if n != 1 else ''})"
        if steps:
            axes[0].plot(steps, _smooth(loss, smooth), color=c, label=label)
        if vsteps:
            axes[1].plot(vsteps, vloss, color=c, marker="o", markersize=3, label=label)
        gap_steps, gap = training_gap(meta, metrics, a, ref, smooth) if a != ref else ([], [])
        if gap_steps:
            axes[2].plot(gap_steps, gap, color=c, label=f"{a} - {ref}")
    axes[0].set_title(f"training loss (seed mean, moving average {smooth})")
    axes[1].set_title("held-out loss (seed mean)")
    axes[2].set_title(f"training-loss gap to {ref}, paired by seed (below 0: lower loss)")
    axes[2].axhline(0.0, color="black", linewidth=0.8)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if any(not line.get_label().startswith("_") for line in ax.lines):  # the zero line has none
            ax.legend(fontsize=8)
    axes[0].set_ylabel("loss (nats/token)")
    if meta["steps"] > 20 and axes[0].lines:
        lo = min(min(line.get_ydata()) for line in axes[0].lines)
        hi = max(line.get_ydata()[min(len(line.get_ydata()) - 1, meta["steps"] // 10)] for line in axes[0].lines)
        if hi > lo:
            axes[0].set_ylim(lo - 0.05 * (hi - lo), hi)
    fig.suptitle(f"ablation {meta['preset']}: {meta['steps']} steps x {meta['tokens_per_step']:,} tokens")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_spike(meta: dict, metrics: dict[str, list[dict]], path: Path) -> Path:
    plt = _plt()
    spike = meta["spike"]
    s, w = spike["step"], spike["window"]
    fig, ax = plt.subplots(figsize=(9, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, a in enumerate(meta["arms"]):
        (steps, loss), _ = _curves(meta, metrics, a)
        pts = [(t, v) for t, v in zip(steps, loss) if t >= s - 2 * w]
        if not pts:
            continue
        c = colors[i % len(colors)]
        ax.plot(*zip(*pts), color=c, label=a)
        pre = [v for t, v in zip(steps, loss) if s - w <= t < s]
        if pre:
            ax.axhline(1.05 * statistics.fmean(pre), color=c, linestyle=":", linewidth=0.8)
    ax.axvline(s, color="black", linestyle="--", linewidth=0.8, label=f"fault (step {s}, LR x {spike['lr_mult']:g})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (seed mean, log scale)")
    ax.set_title("loss spike: dotted lines = 1.05 x each arm's pre-spike mean")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_experts(out: Path, meta: dict, runs: dict[str, dict], path: Path) -> Path | None:
    """experts.png: a row per routed arm (its first seed's run): the experts' shares, and PCA maps
    of held-out tokens coloured by expert (None: no routed arm has finished that run).

    The maps come from each run's expert_map.npz (written when the run finished); a run that has
    none but still has its weights gets one now. A run with neither (trained before the file
    existed, its weights since removed) gets its bars from done.json and no maps."""
    plt = _plt()
    seed = meta["seeds"][0]
    arms = [
        a for a in meta["arms"] if meta["plan"][a]["model"].get("mlp_type") != "dense" and run_name(a, seed) in runs
    ]
    if not arms:
        return None
    fig, axes = plt.subplots(len(arms), 3, figsize=(17, 4.8 * len(arms)), squeeze=False)
    for a, (shares_ax, *map_axes) in zip(arms, axes):
        run_dir = out / "runs" / run_name(a, seed)
        emap = read_expert_map(run_dir) or write_expert_map(run_dir, meta["data"], meta["seq_len"])
        n_experts = meta["plan"][a]["widths"].get("experts", 4)
        bars = _share_bars(emap, runs[run_name(a, seed)].get("expert_shares"), n_experts)
        _draw_share_bars(shares_ax, a, bars, n_experts)
        if emap is None:
            for ax in map_axes:
                ax.set_axis_off()
            continue
        _draw_pca_maps(map_axes, a, emap, n_experts, plt.get_cmap("tab10"))
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def _share_bars(emap: ExpertMap | None, routed: list | None, n_experts: int) -> list[tuple]:
    """(label, each expert's share) for every share known for the arm: of the vocabulary ids and of
    the training data's frequency mass (from a routing table), of the held-out tokens routed at
    the last evaluation (done.json), of the held-out sample's tokens. With k routes per token
    (a (k, V) table) the table's shares count every route, the held-out sample's too."""
    import numpy as np

    bars = []
    table = np.atleast_2d(emap.token_to_expert) if emap is not None and emap.token_to_expert is not None else None
    routes = f", all {table.shape[0]} routes" if table is not None and table.shape[0] > 1 else ""
    if table is not None:
        bars.append((f"vocabulary ids{routes}", np.bincount(table.reshape(-1), minlength=n_experts) / table.size))
        if emap.training_mass is not None:
            bars.append((f"training frequency mass{routes}", emap.training_mass))
    if routed:
        bars.append(("held-out tokens routed (eval, mean over layers)", np.asarray(routed)))
    if emap is not None:
        # a hash-routed token's routes are its table column: every route of the sample, not only the first
        experts = table[:, emap.ids].reshape(-1) if routes else emap.experts
        bars.append(
            (
                f"held-out sample routed (last layer{routes}, {len(emap.ids):,} tokens)",
                np.bincount(experts, minlength=n_experts)[:n_experts] / max(1, len(experts)),
            )
        )
    return bars


def _draw_share_bars(ax, arm: str, bars: list[tuple], n_experts: int) -> None:
    """Grouped bars, one group per expert, and the uniform share (1 / E) as a dashed line."""
    import numpy as np

    x = np.arange(n_experts)
    width = 0.8 / max(1, len(bars))
    for j, (label, vals) in enumerate(bars):
        ax.bar(x + (j - (len(bars) - 1) / 2) * width, vals[:n_experts], width=width, label=label)
    ax.axhline(1.0 / n_experts, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(x, [str(i) for i in x])
    ax.set_xlabel("expert")
    ax.set_ylabel("share")
    ax.set_title(f"{arm}: expert shares")
    if bars:
        ax.legend(fontsize=8)


def _draw_pca_maps(axes, arm: str, emap: ExpertMap, n_experts: int, cmap) -> None:
    """2-D PCA of the final hidden states and of the input embeddings, a colour per expert."""
    maps = (
        ("final hidden states", emap.hidden_2d, "tokens"),
        ("input embeddings", emap.embeddings_2d, "tokens (one dot per distinct id)"),
    )
    for ax, (name, pts, what) in zip(axes, maps):
        for e in range(n_experts):
            m = emap.experts == e
            if m.any():
                ax.scatter(pts[m, 0], pts[m, 1], s=4, alpha=0.5, color=cmap(e % 10), label=f"expert {e}")
        ax.set_title(
            f"{arm}: PCA of {name}\n{len(emap.ids):,} held-out {what}, coloured by expert (last layer)", fontsize=10
        )
        ax.legend(fontsize=8, markerscale=3)
