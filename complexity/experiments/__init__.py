"""Experiments on top of the trainer: the parameter-matched ablation (docs/architecture.md §8),
the loss-spike experiment, their reports (results.md, loss.png, experts.png, spike.png) and the
lm-evaluation-harness bridge.

    from complexity.experiments import plan_arms, run_ablation
    plan = plan_arms("tmlr-187m")                     # arms with matched live parameter counts
    run_ablation(preset="tiny", data="data/builtin-8k", steps=200, out="runs/ablation", seeds=3)

Submodules: arms (the arms and their parameter matching), ablation (the runner and its resume),
run_files (what an ablation folder holds and how it is read), spike (the fault and its recovery
metrics), report (tables and figures), lm_eval_bridge (`run_lm_eval`).
"""

import importlib

# Imported on first use (PEP 562), so `complexity ablate --help`, which reads only the arms, does
# not load the runner and the data pipeline (numpy) behind it.
_EXPORTS = {
    "AblationResult": "ablation",
    "run_ablation": "ablation",
    "ARMS": "arms",
    "DEFAULT_ARMS": "arms",
    "ArmPlan": "arms",
    "plan_arms": "arms",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


__all__ = list(_EXPORTS)
