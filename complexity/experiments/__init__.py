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

from .ablation import AblationResult, run_ablation
from .arms import ARMS, DEFAULT_ARMS, ArmPlan, plan_arms

__all__ = ["ARMS", "DEFAULT_ARMS", "AblationResult", "ArmPlan", "plan_arms", "run_ablation"]
