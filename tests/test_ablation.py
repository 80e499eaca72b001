"""The ablation runner (complexity.experiments): parameter matching, identical data order, results
table and figures, resume of an interrupted ablation, the spike injection. Tiny models, CPU."""

from __future__ import annotations

import json
import math
import re
import signal
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _train_fixtures import make_tiny_data, override_args, tiny_overrides  # noqa: E402

from complexity.experiments.ablation import run_ablation  # noqa: E402
from complexity.experiments.arms import ARMS, DEFAULT_ARMS, TOLERANCE, plan_arms  # noqa: E402
from complexity.experiments.run_files import read_batches  # noqa: E402

VOCAB = 384
MODEL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    _, data = make_tiny_data(tmp_path_factory.mktemp("ablation-data"), vocab_size=VOCAB)
    return data


def _overrides(data_dir, **extra) -> list[str]:
    o = tiny_overrides(data_dir, VOCAB, **extra)
    for k in ("model.preset", "data.path", "training.max_steps"):
        o.pop(k)  # given by run_ablation's own arguments
    o["checkpoint.every"] = 3
    o["eval.every"] = 4
    o["eval.max_batches"] = 2
    return override_args(o)


def _tiny_ablation(data_dir, out, *, steps, seeds, arms, **extra) -> dict:
    """run_ablation's arguments for the tiny preset on the test corpus, quietly."""
    return dict(
        preset="tiny",
        data=data_dir,
        steps=steps,
        out=out,
        seeds=seeds,
        arms=arms,
        overrides=_overrides(data_dir),
        progress=False,
        log=lambda m: None,
        **extra,
    )


def _results_rows(text: str) -> dict[str, list[str]]:
    """The arm rows of the '## Results' table of results.md."""
    section = text.split("## Results", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and cells[0] in ARMS:
            rows[cells[0]] = cells
    return rows


def _number(cell: str) -> float:
    m = re.match(r"^(-?[\d,]+(?:\.\d+)?)(?: ± [\d.,]+)?$", cell)
    assert m, f"not a number (± std): {cell!r}"
    return float(m.group(1).replace(",", ""))


def _hashes(run_dir: Path) -> dict[tuple[int, int], str]:
    return read_batches(run_dir)


def _assert_png(path: Path):
    import matplotlib.image as mpimg

    assert path.is_file(), path
    assert path.stat().st_size > 10_000, f"{path} is suspiciously small"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200


def test_arms_match_parameters_at_the_ablation_size():
    plans = plan_arms("tmlr-187m", list(ARMS))
    ref = plans["routed_mu"]
    assert ref.total == 186_822_144  # the tmlr-187m preset itself
    for p in plans.values():
        assert abs(p.total - ref.total) / ref.total <= TOLERANCE, p.summary()
        assert abs(p.mismatch) <= 0.001, p.summary()  # the solver gets well inside the tolerance
    assert plans["dense"].model["mlp_type"] == "dense" and plans["dense"].model["mu_mode"] == "none"
    assert plans["dense"].widths["intermediate"] > 3000  # widened from upstream's 2416
    assert plans["routed"].widths["expert"] > ref.widths["expert"]  # no mu: wider experts
    assert plans["dense"].total == plans["dense"].active  # dense: every parameter is active
    assert plans["learned_mu"].model["num_experts_per_tok"] == 1
    assert plans["learned_mu"].model["mlp_type"] == "learned_moe"


def test_hash_top2_arm_has_the_references_total_and_active_parameters():
    """Top-2 hash routing over twice as many half-width experts: a token visits as many expert
    parameters as a top-1 token of the reference does, so both counts are equal, exactly."""
    for preset, base in (("tmlr-187m", {}), ("tiny", MODEL)):
        plans = plan_arms(preset, ["routed_mu", "hash_top2", "learned_mu"], base)
        ref, hash_arm = plans["routed_mu"], plans["hash_top2"]
        assert (hash_arm.total, hash_arm.active) == (ref.total, ref.active), preset
        assert hash_arm.widths == {
            "expert": ref.widths["expert"] // 2,
            "experts": 2 * ref.widths["experts"],
            "per_token": 2,
            "shared": ref.widths["shared"],
        }
        assert hash_arm.model["mlp_type"] == "hash_routed" and hash_arm.model["mu_mode"] == "guidance"
        assert abs(plans["learned_mu"].active - ref.active) / ref.active < 0.01  # the other top-1 arm
    with pytest.raises(ValueError, match="expert width 15 does not split into 2"):
        plan_arms("tiny", ["hash_top2"], {**MODEL, "expert_intermediate_size": 15})


def test_dry_run_cli(capsys):
    from complexity.cli import main

    assert main(["ablate", "--preset", "tiny", "--dry-run", *[f"model.{k}={v}" for k, v in MODEL.items()]]) == 0
    out = capsys.readouterr().out
    for arm in DEFAULT_ARMS:
        assert arm in out
    # a nan tolerance used to accept every arm, whatever its mismatch
    assert main(["ablate", "--preset", "tiny", "--dry-run", "--tolerance", "nan"]) == 2
    assert "--tolerance: must be a finite number >= 0" in capsys.readouterr().err


# Every flag of a run with --steps 4, as a real run and a dry run both refuse it.
BAD_FLAGS = [
    (["--steps", "0"], "--steps: must be positive, got 0"),
    (["--steps", "-3"], "--steps: must be positive, got -3"),
    (["--seeds", "1,1"], "--seeds: seeds must be distinct"),
    (["--seeds", "a"], "--seeds: expected a count or a comma-separated list"),
    (["--seeds", "0"], "--seeds: need at least one seed"),
    (["--seeds", "-1"], "--seeds: need at least one seed, got -1"),
    (["--seeds", "0,-1"], "--seeds: seeds must be distinct and >= 0"),
    (["--avg-steps", "0"], "--avg-steps: must lie in [1, --steps=4], got 0"),
    (["--avg-steps", "5"], "--avg-steps: must lie in [1, --steps=4], got 5"),
    (["--spike", "5"], "--spike: the step must lie in [2, --steps=4], got 5"),
    (["--spike", "3", "--spike-window", "0"], "--spike-window: must be at least 1, got 0"),
    # nan used to pass (nan <= 0 is false): every arm trained, then the report failed
    (["--spike", "3", "--spike-lr-mult", "nan"], "--spike-lr-mult: must be a finite positive number, got nan"),
    (["--spike", "3", "--spike-lr-mult", "inf"], "--spike-lr-mult: must be a finite positive number, got inf"),
    (["--tolerance", "nan"], "--tolerance: must be a finite number >= 0 (a relative mismatch), got nan"),
    (["--tolerance", "-1"], "--tolerance: must be a finite number >= 0 (a relative mismatch), got -1.0"),
]


@pytest.mark.parametrize(
    "seeds,message",
    [([1, 1], "distinct and >= 0 (each is one run), got [1, 1]"), ([-2], "got [-2]"), (0, "at least one seed, got 0")],
)
def test_run_ablation_refuses_the_seeds_the_cli_refuses(data_dir, tmp_path, seeds, message):
    """The library's own check (the CLI calls it): two runs may not share a seed's folder."""
    out = tmp_path / "a"
    with pytest.raises(ValueError, match=re.escape(message)):
        run_ablation(**_tiny_ablation(data_dir, out, steps=4, seeds=seeds, arms=["dense"]))
    assert not (out / "runs").exists()


@pytest.mark.parametrize("flags,message", BAD_FLAGS)
def test_bad_flags_are_one_line_errors(data_dir, tmp_path, capsys, flags, message):
    from complexity.cli import main

    argv = ["ablate", "--preset", "tiny", "--data", str(data_dir), "--steps", "4", "--out", str(tmp_path / "a")]
    assert main([*argv, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "a" / "runs").exists()


@pytest.mark.parametrize("flags,message", BAD_FLAGS)
def test_dry_run_refuses_the_flags_a_run_refuses(capsys, flags, message):
    """The dry run used to print the plans whatever --steps, --seeds, --avg-steps or --spike said."""
    from complexity.cli import main

    assert main(["ablate", "--preset", "tiny", "--dry-run", "--steps", "4", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_dry_run_checks_what_it_can_without_steps(capsys):
    from complexity.cli import main

    argv = ["ablate", "--preset", "tiny", "--dry-run"]
    assert main([*argv, "--seeds", "0,2", "--steps", "4", "--avg-steps", "4", "--spike", "2"]) == 0
    assert main([*argv, "--seeds", "-1"]) == 2
    assert "--seeds: need at least one seed, got -1" in capsys.readouterr().err
    for flag in ("--avg-steps", "--spike"):
        assert main([*argv, flag, "3"]) == 2
        assert (
            capsys.readouterr().err.strip()
            == f"complexity ablate: error: missing --steps ({flag} is checked against it)"
        )


_UNKNOWN_ARM = f"--arms: unknown arm(s) bogus; available: {', '.join(ARMS)}"


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--dry-run"], "give --preset NAME or --config RECIPE"),
        (["--dry-run", "--report-only"], "give --preset NAME or --config RECIPE"),
        (["--report-only"], "--report-only needs --out DIR (an ablation folder)"),
        (["--preset", "tiny"], "missing --data, --steps, --out"),
        (["--preset", "tiny", "--steps", "4", "--arms", "bogus"], "missing --data, --out"),
        (["--preset", "tiny", "--data", "D", "--steps", "4", "--out", "OUT", "--arms", "bogus"], _UNKNOWN_ARM),
        (["--preset", "tiny", "--data", "D", "--steps", "4", "--out", "OUT", "--arms", "bogus", "a.b=1"], _UNKNOWN_ARM),
        (
            ["--preset", "tiny", "--data", "D", "--steps", "4", "--out", "OUT", "--arms", "bogus", "--seeds", "a"],
            _UNKNOWN_ARM,
        ),
    ],
)
def test_cli_names_the_first_missing_or_unknown_flag_before_writing(tmp_path, capsys, flags, message):
    """Checked in this order (dry run, report only, the flags a training needs, the arms, the
    seeds), one line each, before any file is written."""
    from complexity.cli import main

    out = tmp_path / "out"
    assert main(["ablate", *[str(out) if f == "OUT" else f for f in flags]]) == 2
    assert capsys.readouterr().err.strip() == f"complexity ablate: error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_dry_run_cli_reads_overrides_given_after_the_arms(capsys):
    """argparse gives `--arms a b KEY=VALUE`'s overrides to --arms: they are moved back."""
    from complexity.cli import main

    overrides = [f"model.{k}={v}" for k, v in MODEL.items()]
    assert main(["ablate", "--preset", "tiny", "--dry-run", *overrides, "--arms", "dense", "routed_mu"]) == 0
    before = capsys.readouterr().out
    assert main(["ablate", "--preset", "tiny", "--dry-run", "--arms", "dense", "routed_mu", *overrides]) == 0
    after = capsys.readouterr().out
    assert after == before and len(after.splitlines()) == 2
    assert main(["ablate", "--preset", "tiny", "--dry-run", "--arms", "dense", "routed_mu"]) == 0
    assert capsys.readouterr().out != before  # the overrides changed the widths


def test_dry_run_cli_takes_the_model_from_a_recipe_or_the_overrides(tmp_path, capsys):
    """The base model of the arms: --preset and model.* overrides, a recipe's [model] section, or
    model.preset=NAME; overrides win over the recipe."""
    from complexity.cli import main

    overrides = [f"model.{k}={v}" for k, v in MODEL.items()]
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        "[model]\npreset = 'tiny'\n" + "".join(f"{k} = {v}\n" for k, v in MODEL.items()) + "[training]\nseq_len = 128\n"
    )
    outputs = []
    for argv in (
        ["--preset", "tiny", *overrides],
        ["--config", str(recipe)],
        ["--config", str(recipe), "model.hidden_size=32", "model.hidden_size=64"],
        ["model.preset=tiny", *overrides],
    ):
        assert main(["ablate", "--dry-run", *argv]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs == [outputs[0]] * 4
    assert main(["ablate", "--dry-run", "--config", str(recipe), "model.hidden_size=32"]) == 0
    assert capsys.readouterr().out != outputs[0]
    # the recipe is checked with every override, as the run checks it: a training.* one included
    recipe.write_text(recipe.read_text() + "max_steps = 10\n[schedule]\nwarmup_steps = 20\n")
    assert main(["ablate", "--dry-run", "--config", str(recipe)]) == 2
    assert "schedule.warmup_steps: 20 exceeds training.max_steps=10" in capsys.readouterr().err
    assert main(["ablate", "--dry-run", "--config", str(recipe), "training.max_steps=40"]) == 0
    assert capsys.readouterr().out == outputs[0]


def test_cli_hands_every_flag_to_run_ablation_and_prints_the_outcome(tmp_path, capsys, monkeypatch):
    """The flags as run_ablation's arguments (seeds parsed, the command line as typed), then the
    report and figures on stdout; an interrupted ablation says how to continue, exit 0 when
    --stop-after asked for it, else 128 + the signal's number, as for `complexity train`."""
    from complexity.cli import main
    from complexity.experiments import ablation

    calls, outcome = [], {}

    def fake_run_ablation(**kwargs):
        calls.append(kwargs)
        return ablation.AblationResult(out=Path(kwargs["out"]), plan={}, **outcome)

    monkeypatch.setattr(ablation, "run_ablation", fake_run_ablation)
    out = tmp_path / "abl"
    flags = ["--preset", "tiny", "--data", "D", "--steps", "9", "--out", str(out), "--seeds", "3,5"]
    flags += ["--arms", "dense", "routed", "training.lr=0.1", "--avg-steps", "4", "--spike", "6"]
    flags += ["--spike-lr-mult", "3", "--spike-window", "2", "--tolerance", "0.5", "--time-limit", "600"]
    flags += ["--run-seconds", "200.5", "--stop-after", "7"]
    monkeypatch.setattr(sys, "argv", ["complexity", "ablate", *flags])

    outcome.update(report=out / "results.md", figures=[out / "loss.png", out / "experts.png"])
    assert main(["ablate", *flags]) == 0
    assert calls.pop() == dict(
        preset="tiny",
        recipe=None,
        data="D",
        steps=9,
        out=str(out),
        seeds=[3, 5],
        arms=["dense", "routed"],
        overrides=["training.lr=0.1"],
        avg_k=4,
        spike_step=6,
        spike_lr_mult=3.0,
        spike_window=2,
        tolerance=0.5,
        stop_after=7,
        command="complexity ablate " + " ".join(flags),
        time_limit=600.0,
        run_seconds=200.5,
    )
    assert capsys.readouterr().out.splitlines() == [str(out / f) for f in ("results.md", "loss.png", "experts.png")]

    outcome.update(interrupted=True, report=None, figures=[])
    stopped = f"ablation stopped before the end; rerun the same command to continue ({out})"
    assert main(["ablate", *flags]) == 0
    assert capsys.readouterr().err.strip() == stopped
    outcome.update(out_of_time=True)  # --time-limit: EX_TEMPFAIL, so a job script tells it from the end
    assert main(["ablate", *flags]) == 75
    assert capsys.readouterr().err.strip() == stopped
    outcome.update(out_of_time=False)
    monkeypatch.setattr(sys, "argv", ["pytest"])
    for sig, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        outcome.update(signal=sig)
        assert main(["ablate", *flags[:-2]]) == status
        assert calls[-1]["command"] is None and calls[-1]["stop_after"] is None
        captured = capsys.readouterr()
        assert (captured.out, captured.err.strip()) == ("", stopped)


def test_cli_takes_data_and_steps_from_the_recipe_unless_given(tmp_path, capsys, monkeypatch):
    """With --config, --data and --steps default to the recipe's data.path and training.max_steps
    (overrides applied); given flags win, and the recipe is checked against them before any run."""
    from complexity.cli import main
    from complexity.experiments import ablation

    calls = []
    monkeypatch.setattr(
        ablation, "run_ablation", lambda **kw: calls.append(kw) or ablation.AblationResult(out=Path(kw["out"]), plan={})
    )
    recipe = tmp_path / "r.toml"
    recipe.write_text("[model]\npreset = 'tiny'\n[data]\npath = 'prepared'\n[training]\nmax_steps = 40\n")
    recipe.write_text(recipe.read_text() + "[schedule]\nwarmup_steps = 15\n")
    base = ["ablate", "--config", str(recipe), "--out", str(tmp_path / "abl")]
    assert main(base) == 0
    assert (calls[-1]["data"], calls[-1]["steps"]) == ("prepared", 40)
    assert main([*base, "training.max_steps=30", "data.path=other"]) == 0
    assert (calls[-1]["data"], calls[-1]["steps"]) == ("other", 30)
    assert main([*base, "--data", "D", "--steps", "20"]) == 0
    assert (calls[-1]["data"], calls[-1]["steps"]) == ("D", 20)
    capsys.readouterr()
    for argv in ([*base, "--steps", "10"], ["ablate", "--config", str(recipe), "--steps", "10", "--dry-run"]):
        assert main(argv) == 2
        assert "schedule.warmup_steps: 15 exceeds training.max_steps=10" in capsys.readouterr().err
    assert len(calls) == 3


def test_report_only_cli_prints_the_report_and_its_figures(tmp_path, capsys, monkeypatch):
    from complexity.cli import main
    from complexity.experiments import report

    written = []

    def fake_write_report(out):
        written.append(out)
        return Path(out) / "results.md", [Path(out) / "loss.png", Path(out) / "spike.png"]

    monkeypatch.setattr(report, "write_report", fake_write_report)
    assert main(["ablate", "--report-only", "--out", str(tmp_path)]) == 0
    assert written == [str(tmp_path)]
    assert capsys.readouterr().out.splitlines() == [str(tmp_path / f) for f in ("results.md", "loss.png", "spike.png")]


def test_stop_after_must_be_positive(capsys):
    from complexity.cli import main

    for command in (["ablate", "--preset", "tiny"], ["train"]):
        with pytest.raises(SystemExit) as info:
            main([*command, "--stop-after", "0"])
        assert info.value.code == 2 and "--stop-after: expected a positive integer, got 0" in capsys.readouterr().err


def test_ablation_table_figures_data_order_and_resume(data_dir, tmp_path):
    out = tmp_path / "abl"
    arms = ["dense", "routed_mu"]
    kw = _tiny_ablation(data_dir, out, steps=8, seeds=2, arms=arms)

    # 1. Interrupted after the first arm has finished.
    class Stop(Exception):
        pass

    def stop_after_first(arm, seed, summary):
        raise Stop

    with pytest.raises(Stop):
        run_ablation(**kw, on_run_end=stop_after_first)
    first = out / "runs" / "dense-s0"
    assert (first / "done.json").is_file()
    assert not (out / "runs" / "routed_mu-s0").exists()
    done_mtime = (first / "done.json").stat().st_mtime_ns
    metrics_before = (first / "metrics.jsonl").read_text()

    # 2. Preempted in the middle of the second run (checkpoint at step 3).
    res = run_ablation(**kw, stop_after=3)
    assert res.interrupted
    second = out / "runs" / "routed_mu-s0"
    assert (second / "resolved.json").is_file() and not (second / "done.json").exists()

    # 3. The same command again: finishes everything, retrains nothing that was done.
    trained = []
    res = run_ablation(**kw, on_run_end=lambda arm, seed, s: trained.append(f"{arm}-s{seed}"))
    assert not res.interrupted
    assert trained == ["routed_mu-s0", "dense-s1", "routed_mu-s1"]
    assert (first / "done.json").stat().st_mtime_ns == done_mtime
    assert (first / "metrics.jsonl").read_text() == metrics_before
    run_info = json.loads((second / "run.json").read_text())
    assert run_info["resumed_from"] and "step_00000003" in run_info["resumed_from"]
    steps = [
        json.loads(line)["step"]
        for line in (second / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line) and "event" not in json.loads(line)
    ]
    assert steps == list(range(1, 9))  # one line per step, none lost or doubled by the resume

    # Same data in the same order in every arm (per seed); another seed, another order.
    for seed in (0, 1):
        h = {a: _hashes(out / "runs" / f"{a}-s{seed}") for a in arms}
        assert len(h["dense"]) == 8 * 2  # 8 steps x 2 micro-batches (256 tokens = 2 x 4 x 32)
        assert sorted({s for s, _ in h["dense"]}) == list(range(1, 9))
        assert h["dense"] == h["routed_mu"]
    assert _hashes(out / "runs" / "dense-s0") != _hashes(out / "runs" / "dense-s1")

    # Parameter counts as planned and matched.
    meta = json.loads((out / "ablation.json").read_text())
    totals = {a: meta["plan"][a]["total"] for a in arms}
    assert abs(totals["dense"] - totals["routed_mu"]) / totals["routed_mu"] <= TOLERANCE
    for a in arms:
        resolved = json.loads((out / "runs" / f"{a}-s0" / "resolved.json").read_text())
        from complexity.params import count_parameters
        from complexity.train.config import RunConfig

        assert count_parameters(RunConfig.from_dict(resolved).model.build()).total == totals[a]

    # The table: a row per arm with numbers, over 2 seeds.
    text = (out / "results.md").read_text()
    rows = _results_rows(text)
    assert set(rows) == set(arms)
    for a, cells in rows.items():
        assert cells[2] == "2"
        for cell in cells[3:8]:  # val loss, val bpb, avg train loss, final train loss, tokens/s
            assert 0 < _number(cell)
        assert "±" in cells[3]
        assert _number(cells[8]) == totals[a]
    assert "complexity ablate" in text and "--steps 8" in text
    assert "complexity train --config" in text
    _assert_png(out / "loss.png")
    _assert_png(out / "experts.png")

    # A different plan in the same folder is refused, not mixed in.
    with pytest.raises(ValueError, match="different plan"):
        run_ablation(**{**kw, "steps": 9})


def test_time_limit_starts_no_run_that_could_not_finish(data_dir, tmp_path):
    """The first run always starts; a run longer than the time left is not started (the longest
    run so far, or --run-seconds, is its length), and what is left resumes on the next call."""
    out = tmp_path / "abl"
    kwargs = _tiny_ablation(data_dir, out, steps=4, seeds=1, arms=["dense", "routed"], report=False)
    stopped = run_ablation(**kwargs, time_limit=1e-3)  # the first run outlasts the limit
    assert stopped.interrupted and stopped.out_of_time and stopped.signal is None
    assert list(stopped.runs) == ["dense-s0"] and not (out / "runs" / "routed-s0").exists()
    too_long = run_ablation(**kwargs, time_limit=3600, run_seconds=7200)
    assert too_long.out_of_time and list(too_long.runs) == ["dense-s0"]
    assert not (out / "runs" / "routed-s0").exists()
    finished = run_ablation(**kwargs, time_limit=3600)
    assert not finished.interrupted and list(finished.runs) == ["dense-s0", "routed-s0"]
    with pytest.raises(ValueError, match="--run-seconds: must be a positive number of seconds, got 0"):
        run_ablation(**kwargs, time_limit=10, run_seconds=0)


def test_spike_injected_at_the_same_step_in_every_arm(data_dir, tmp_path):
    out = tmp_path / "spike"
    arms = ["dense", "routed", "hash_top2"]
    res = run_ablation(
        **_tiny_ablation(data_dir, out, steps=10, seeds=1, arms=arms, spike_step=6, spike_lr_mult=10.0, spike_window=3)
    )
    assert not res.interrupted
    for a in arms:
        run_dir = out / "runs" / f"{a}-s0"
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        injected = [r["step"] for r in records if r.get("event") == "spike_injected"]
        assert injected == [6]
        losses = {r["step"]: r["loss"] for r in records if "loss" in r and "event" not in r}
        assert sorted(losses) == list(range(1, 11))  # the guard is off: no step skipped
        # Random targets: about ln V whatever the model has learnt, above the real-data losses before.
        assert losses[6] > max(losses[s] for s in (3, 4, 5)) and losses[6] > 0.95 * math.log(VOCAB)
        assert json.loads((run_dir / "resolved.json").read_text())["spike"]["enabled"] is False
        summary = json.loads((run_dir / "done.json").read_text())["spike"]
        assert summary["injected_at"] == [6] and summary["fault_loss"] == losses[6]
    shares = json.loads((out / "runs" / "hash_top2-s0" / "done.json").read_text())["expert_shares"]
    assert len(shares) == 8 and sum(shares) == pytest.approx(1.0, abs=1e-4)  # shares of the 2 routes per token
    text = (out / "results.md").read_text()
    assert "hash_top2" in _results_rows(text)
    assert "## Spike at step 6" in text
    _assert_png(out / "spike.png")


def test_report_assembled_elsewhere_from_the_runs_small_files(data_dir, tmp_path):
    """An ablation trained in pieces on machines that keep nothing: each finished routed run
    leaves expert_map.npz, so the report drawn from a copy without weights (checkpoints/, final/)
    has experts.png with its maps, from the same map the weights give."""
    import shutil

    import numpy as np

    from complexity.experiments.expert_map import read_expert_map, write_expert_map
    from complexity.experiments.report import write_report

    out = tmp_path / "trained"
    arms = ["dense", "routed_mu", "hash_top2"]
    run_ablation(**_tiny_ablation(data_dir, out, steps=4, seeds=1, arms=arms))
    assert not (out / "runs" / "dense-s0" / "expert_map.npz").exists()  # nothing routed to map
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(out, elsewhere, ignore=shutil.ignore_patterns("checkpoints", "final", "*.png", "results.md"))
    for arm, n_experts in (("routed_mu", 4), ("hash_top2", 8)):
        run = elsewhere / "runs" / f"{arm}-s0"
        assert not (run / "final").exists() and not (run / "checkpoints").exists()
        emap = read_expert_map(run)
        assert emap is not None and len(emap.ids) == len(emap.experts) == len(emap.hidden_2d) > 0
        assert emap.hidden_2d.shape[1] == emap.embeddings_2d.shape[1] == 2
        assert 0 <= emap.experts.min() and emap.experts.max() < n_experts
        # the routing table: top-1 (V,), hash-routed top-2 (2, V); the first route colours each token
        table = np.atleast_2d(emap.token_to_expert)
        vocab = json.loads((data_dir / "manifest.json").read_text())["vocab_size"]
        assert table.shape == ((2, vocab) if arm == "hash_top2" else (1, vocab))
        np.testing.assert_array_equal(emap.experts, table[0, emap.ids])
        counts = np.load(data_dir / "token_counts.npy")  # the training tokens' share per expert, every route
        want = sum(np.bincount(row[: len(counts)], weights=counts, minlength=n_experts) for row in table)
        np.testing.assert_allclose(emap.training_mass, want / want.sum(), rtol=1e-12)
        again = write_expert_map(out / "runs" / f"{arm}-s0", str(data_dir), 32)  # from the weights, once more
        for a, b in zip(emap, again):
            assert (a is None and b is None) or np.array_equal(a, b)
    write_report(elsewhere)
    _assert_png(elsewhere / "experts.png")
    assert (elsewhere / "results.md").read_text() == (out / "results.md").read_text()


def test_share_bars_count_every_route_of_a_hash_routed_arm():
    """A (k, V) table: the vocabulary's and the held-out sample's shares count all k routes of
    each token (worked by hand); a top-1 table and a learned router keep their single route."""
    import numpy as np

    from complexity.experiments.expert_map import ExpertMap
    from complexity.experiments.report import _share_bars

    table = np.array([[0, 1, 2, 3], [1, 2, 3, 3]])  # token 0 -> experts 0, 1; token 3 -> 3, 3
    ids = np.array([3, 3, 0])
    two_d = np.zeros((3, 2), dtype=np.float32)
    emap = ExpertMap(ids, table[0, ids], two_d, two_d, table, np.array([0.1, 0.2, 0.3, 0.4]))
    bars = dict(_share_bars(emap, None, 4))
    assert list(bars) == [
        "vocabulary ids, all 2 routes",
        "training frequency mass, all 2 routes",
        "held-out sample routed (last layer, all 2 routes, 3 tokens)",
    ]
    np.testing.assert_allclose(bars["vocabulary ids, all 2 routes"], [1 / 8, 2 / 8, 2 / 8, 3 / 8])
    # routes of 3, 3, 0: (3, 3), (3, 3), (0, 1) -> expert 0 once, 1 once, 3 four times of six
    np.testing.assert_allclose(
        bars["held-out sample routed (last layer, all 2 routes, 3 tokens)"], [1 / 6, 1 / 6, 0, 4 / 6]
    )
    top1 = dict(_share_bars(emap._replace(token_to_expert=table[0], experts=table[0, ids]), None, 4))
    np.testing.assert_allclose(top1["held-out sample routed (last layer, 3 tokens)"], [1 / 3, 0, 0, 2 / 3])
    np.testing.assert_allclose(top1["vocabulary ids"], [0.25] * 4)
    learned = _share_bars(emap._replace(token_to_expert=None, training_mass=None), [0.5, 0.5, 0, 0], 4)
    assert [label for label, _ in learned] == [
        "held-out tokens routed (eval, mean over layers)",
        "held-out sample routed (last layer, 3 tokens)",
    ]


def test_pca_2d_matches_the_leading_principal_components():
    """The maps' projection: the first two principal axes (float64 eigendecomposition of the
    covariance as the reference), coordinates equal up to each axis's sign."""
    import numpy as np

    from complexity.experiments.expert_map import pca_2d

    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 16)) @ np.diag(np.linspace(4.0, 0.5, 16)) + 3.0
    got = pca_2d(x.astype(np.float32))
    centered = x - x.mean(0)
    vals, vecs = np.linalg.eigh(centered.T @ centered)
    want = centered @ vecs[:, np.argsort(vals)[::-1][:2]]
    for i in range(2):
        sign = np.sign(got[:, i] @ want[:, i])
        np.testing.assert_allclose(sign * got[:, i], want[:, i], rtol=0, atol=1e-4 * np.abs(want).max())


def test_rerun_on_a_different_corpus_is_refused(tmp_path):
    """The data folder rebuilt at the same path from other text (another machine's packages): the
    plan records the corpus's sha256, so the new runs are not mixed with the old ones."""
    import shutil

    root = tmp_path / "corpus"
    _, data = make_tiny_data(root, vocab_size=VOCAB)
    out = tmp_path / "abl"
    kw = _tiny_ablation(data, out, steps=2, seeds=1, arms=["dense"])
    run_ablation(**kw)
    shutil.rmtree(data)
    make_tiny_data(root, vocab_size=VOCAB, n_docs=300)  # same tokenizer, other documents
    with pytest.raises(ValueError, match=r"different plan[\s\S]*corpus: was"):
        run_ablation(**kw)


def test_one_arm_ablation_reports_without_warnings(data_dir, tmp_path):
    """One arm: the gap panel holds only its zero line, so it gets no legend (matplotlib would
    warn "No artists with labels found")."""
    out = tmp_path / "one"
    messages = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        res = run_ablation(
            **{**_tiny_ablation(data_dir, out, steps=4, seeds=1, arms=["dense"]), "log": messages.append}
        )
    assert not res.interrupted
    assert any(re.fullmatch(r"ablate: dense-s0 finished in \d+ s", m) for m in messages), messages
    assert list(_results_rows((out / "results.md").read_text())) == ["dense"]
    _assert_png(out / "loss.png")


# ----------------------------------------------------------------------------- results.md, pinned

REPORT_FIXTURES = Path(__file__).parent / "fixtures" / "ablation_report"


def _report_inputs(spike: bool) -> tuple[dict, dict[str, dict]]:
    """An ablation.json and done.json contents covering every part of results.md: two seeds, a run
    not finished, a value not measured, one seed only for an arm (no std), expert shares of
    different lengths, spike summaries with a run that never recovered."""
    plan = {
        "dense": dict(
            label="(1) dense SwiGLU, no mu",
            model={"mlp_type": "dense"},
            total=131_712,
            active=131_712,
            mismatch=0.00097,
            widths={"intermediate": 214},
        ),
        "routed_mu": dict(
            label="(2) token-routed + shared + zipf + mu guidance",
            model={"mlp_type": "token_routed"},
            total=131_584,
            active=94_720,
            mismatch=0.0,
            widths={"expert": 32, "experts": 4, "shared": 32},
        ),
        "hash_top2": dict(
            label="(6) top-2 hash routing",
            model={"mlp_type": "hash_routed"},
            total=131_584,
            active=94_720,
            mismatch=-0.0004,
            widths={"expert": 16, "experts": 8, "per_token": 2},
        ),
    }
    meta = {
        "command": "complexity ablate --preset tiny --data DATA --steps 8 --seeds 2 --out OUT",
        "preset": "tiny",
        "data": "DATA",
        "steps": 8,
        "seeds": [0, 1],
        "arms": list(plan),
        "avg_k": 6,
        "tolerance": 0.005,
        "reference_arm": "routed_mu",
        "tokens_per_step": 256,
        "seq_len": 32,
        "precision": "auto",
        "compile": False,
        "plan": plan,
        "spike": {"step": 5, "lr_mult": 10.0, "window": 2, "seed": 1234, "fault": "uniform random ids"}
        if spike
        else None,
    }

    def done(arm, seed, val_loss, tokens_per_s, shares=None, recovery=2):
        d = {
            "arm": arm,
            "seed": seed,
            "steps": 8,
            "avg_train_loss_first_k": 5.7 + 0.01 * seed,
            "avg_k": 6,
            "final_train_loss": 4.67 - 0.02 * seed,
            "val_loss": val_loss,
            "val_bpb": None if val_loss is None else val_loss / 2.73,
            "val_ppl": None,
            "expert_shares": shares,
            "tokens_per_s": tokens_per_s,
            "total_params": plan[arm]["total"],
            "active_params": plan[arm]["active"],
            "train_command": f"complexity train --config OUT/runs/{arm}-s{seed}/resolved.json --out OUT/runs/{arm}-s{seed} --overwrite",
        }
        if spike:
            d["spike"] = {
                "step": 5,
                "window": 2,
                "threshold": 0.05,
                "pre": 5.31 + 0.02 * seed,
                "fault_loss": 5.96,
                "injected_at": [5],
                "peak": 5.9 - 0.3 * seed,
                "peak_step": 6,
                "peak_ratio": 1.1 - 0.05 * seed,
                "recovery": recovery,
            }
        return d

    runs = {
        "dense-s0": done("dense", 0, 4.4889, 15_862.0),
        "dense-s1": done("dense", 1, None, 15_419.5, recovery=None),
        "routed_mu-s0": done("routed_mu", 0, 4.4988, 13_036.0, [0.207, 0.258, 0.246, 0.289]),
        "routed_mu-s1": done("routed_mu", 1, 4.5401, 12_939.0, [0.21, 0.25, 0.25, 0.29]),
        "hash_top2-s0": done(
            "hash_top2", 0, 4.4536, 11_462.0, [0.103, 0.112, 0.105, 0.137, 0.115, 0.102, 0.122, 0.204]
        ),
    }
    return meta, runs


@pytest.mark.parametrize("spike", [False, True], ids=["plain", "spike"])
def test_results_markdown_is_pinned(spike):
    """results.md for fixed inputs, byte for byte (the fixture was written by the report as it was
    before its sections became functions of their own; since then an arm with fewer experts than
    the widest gets "-" cells, so its row is as long as the header)."""
    from complexity.experiments.report import results_markdown

    expected = (REPORT_FIXTURES / f"results_{'spike' if spike else 'plain'}.md").read_text(encoding="utf-8")
    assert results_markdown(*_report_inputs(spike)) == expected


def test_paired_differences_against_dense_say_which_gaps_three_seeds_resolve():
    """Per seed arm - dense; the 95% interval is mean ± t(0.975, 2) x std / sqrt(3) with t = 4.303
    (worked by hand below); a gap is resolved when the interval excludes 0."""
    from complexity.experiments.report import _paired_table

    val = {"dense": [4.00, 4.10, 4.05], "routed": [3.95, 4.06, 3.99], "inl": [4.02, 4.07, 4.06]}
    meta = {"arms": list(val), "seeds": [0, 1, 2]}
    runs = {f"{a}-s{s}": {"val_loss": v[s], "val_bpb": v[s] / 2.0} for a, v in val.items() for s in range(3)}
    rows = {line.split(" | ")[0].strip("| "): line for line in _paired_table(meta, runs) if line.startswith("| ")}
    # routed: -0.05, -0.04, -0.06 -> mean -0.05, std 0.01, half-width 4.303 * 0.01 / sqrt(3) = 0.0248
    assert rows["routed"] == (
        "| routed | 3 | -0.0500 ± 0.0100 | [-0.0748, -0.0252] | -0.0250 ± 0.0050 | 3/3 | yes: below dense |"
    )
    # inl: +0.02, -0.03, +0.01 -> mean 0, std 0.0265: unresolved
    assert rows["inl"] == "| inl | 3 | +0.0000 ± 0.0265 | [-0.0657, +0.0657] | +0.0000 ± 0.0132 | 1/3 | no |"
    assert "dense" not in rows
    assert _paired_table({"arms": ["routed", "inl"], "seeds": [0]}, runs) == []  # nothing to pair with


def test_training_gap_pairs_seeds_while_an_ablation_is_unfinished():
    """Dense has seeds 0 and 1, routed only seed 0: the gap is routed-s0 - dense-s0 (worked by
    hand), not routed-s0 minus the mean of dense's two seeds; with both seeds of both, the mean of
    the per-seed differences."""
    from complexity.experiments.report import training_gap

    def metrics(losses):
        return [{"step": t + 1, "loss": v} for t, v in enumerate(losses)] + [{"step": 2, "event": "eval"}]

    loss = {"dense-s0": [5.0, 4.0, 3.0], "dense-s1": [6.0, 5.0, 4.0], "routed-s0": [4.5, 3.5, 2.0]}
    meta = {"arms": ["dense", "routed"], "seeds": [0, 1]}
    runs = {name: metrics(v) for name, v in loss.items()}
    assert training_gap(meta, runs, "routed", "dense", smooth=1) == ([1, 2, 3], [-0.5, -0.5, -1.0])
    # moving average of 2: dense-s0 5.0, 4.5, 3.5; routed-s0 4.5, 4.0, 2.75
    assert training_gap(meta, runs, "routed", "dense", smooth=2) == ([1, 2, 3], [-0.5, -0.5, -0.75])
    runs["routed-s1"] = metrics([5.0, 5.5, 3.0])  # per seed: -0.5, -0.5, -1.0 and -1.0, +0.5, -1.0
    steps, gap = training_gap(meta, runs, "routed", "dense", smooth=1)
    assert steps == [1, 2, 3] and gap == pytest.approx([-0.75, 0.0, -1.0], abs=1e-12)
    assert training_gap(meta, {"routed-s0": runs["routed-s0"]}, "routed", "dense", smooth=1) == ([], [])


# ----------------------------------------------------------------------------- done.json, checked


def _ablation_folder(root: Path) -> Path:
    """An ablation folder holding the pinned inputs: ablation.json and each run's done.json."""
    meta, runs = _report_inputs(spike=True)
    (root / "ablation.json").write_text(json.dumps(meta))
    for name, done in runs.items():
        (root / "runs" / name).mkdir(parents=True)
        (root / "runs" / name / "done.json").write_text(json.dumps(done))
    return root


def test_done_json_as_the_runner_writes_it_reads_back(tmp_path):
    from complexity.experiments.run_files import read_done

    out = _ablation_folder(tmp_path)
    for name, done in _report_inputs(spike=True)[1].items():
        assert read_done(out / "runs" / name) == done  # nulls (not measured) included


def _set(*keys, value):
    def edit(done):
        for k in keys[:-1]:
            done = done[k]
        done[keys[-1]] = value

    return edit


BAD_DONE = {
    "val_loss a string": (
        _set("val_loss", value="4.49"),
        "the field 'val_loss' should be a finite number or null, found '4.49'",
    ),
    "val_bpb NaN": (
        _set("val_bpb", value=math.nan),
        "the field 'val_bpb' should be a finite number or null, found nan",
    ),
    "tokens/s infinite": (
        _set("tokens_per_s", value=math.inf),
        "the field 'tokens_per_s' should be a finite number or null, found inf",
    ),
    "loss a boolean": (
        _set("avg_train_loss_first_k", value=True),
        "the field 'avg_train_loss_first_k' should be a finite number or null, found True",
    ),
    "total a float": (
        _set("total_params", value=131712.5),
        "the field 'total_params' should be an integer, found 131712.5",
    ),
    "total a string": (
        _set("total_params", value="131,712"),
        "the field 'total_params' should be an integer, found '131,712'",
    ),
    "active missing": (lambda d: d.pop("active_params"), "the field 'active_params' is missing"),
    "shares with a string": (
        _set("expert_shares", value=[0.5, "x"]),
        "the field 'expert_shares' should be a list of finite numbers or null, found [0.5, 'x']",
    ),
    "shares an object": (
        _set("expert_shares", value={"0": 1.0}),
        "the field 'expert_shares' should be a list of finite numbers or null, found {'0': 1.0}",
    ),
    "spike null": (_set("spike", value=None), "the field 'spike' should be an object, found None"),
    "spike peak a string": (
        _set("spike", "peak", value="high"),
        "the spike summary: the field 'peak' should be a finite number or null, found 'high'",
    ),
    "spike recovery infinite": (
        _set("spike", "recovery", value=-math.inf),
        "the spike summary: the field 'recovery' should be a finite number or null, found -inf",
    ),
    "spike steps not integers": (
        _set("spike", "injected_at", value=[5.0]),
        "the spike summary: the field 'injected_at' should be a list of step numbers, found [5.0]",
    ),
}


@pytest.mark.parametrize("kind", list(BAD_DONE))
def test_done_json_with_a_wrong_value_names_file_field_and_value(tmp_path, capsys, kind):
    """A done.json value of the wrong type (or not finite) is one FileFormatError naming the file,
    the field and what it holds, and saying what to do; not a TypeError deep in the report or a
    nonsense number in results.md."""
    from complexity.cli import main
    from complexity.data.files import FileFormatError
    from complexity.experiments.report import write_report
    from complexity.experiments.run_files import DONE_REMEDY, read_done

    edit, what = BAD_DONE[kind]
    out = _ablation_folder(tmp_path)
    path = out / "runs" / "dense-s0" / "done.json"
    done = json.loads(path.read_text())
    edit(done)
    path.write_text(json.dumps(done))  # NaN and Infinity as Python's json writes them
    expected = f"{path}: {what}; {DONE_REMEDY}"
    for call in (lambda: read_done(path.parent), lambda: write_report(out)):
        with pytest.raises(FileFormatError) as info:
            call()
        assert str(info.value) == expected
    assert main(["ablate", "--report-only", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"complexity ablate: error: {expected}"
    assert not (out / "results.md").exists()


def _npz_bytes(**arrays) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _good_map(n: int = 5) -> dict:
    import numpy as np

    return dict(ids=np.arange(n), experts=np.zeros(n), hidden_2d=np.zeros((n, 2)), embeddings_2d=np.zeros((n, 2)))


def _table(shape: tuple):
    import numpy as np

    return np.zeros(shape, np.int16)


BAD_MAPS = {
    "truncated": (lambda: _npz_bytes(**_good_map())[:-40], "unreadable (BadZipFile: "),
    "not a zip": (lambda: b"expert map", "unreadable ("),
    "missing field": (lambda: _npz_bytes(**_drop(_good_map(), "ids")), "missing ids"),
    "lengths differ": (
        lambda: _npz_bytes(**{**_good_map(), "experts": _good_map(4)["experts"]}),
        "its arrays disagree in length, or the coordinates are not (n, 2)",
    ),
    "table of 3 dims": (
        lambda: _npz_bytes(**_good_map(), token_to_expert=_table((2, 2, 8))),
        "token_to_expert has shape [2, 2, 8], expected (V,) or (k, V)",
    ),
    "ids past the table": (
        lambda: _npz_bytes(**_good_map(), token_to_expert=_table((2, 3))),  # ids 0..4
        "token ids outside the routing table's vocabulary [0, 3)",
    ),
}


def _drop(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


@pytest.mark.parametrize("kind", list(BAD_MAPS))
def test_damaged_expert_map_names_the_file_and_what_to_do(data_dir, tmp_path, capsys, kind):
    """A damaged expert_map.npz stops the report with one FileFormatError naming the file, the
    problem and the remedy (delete it), not a KeyError or BadZipFile from numpy."""
    from complexity.cli import main
    from complexity.data.files import FileFormatError
    from complexity.experiments.expert_map import REMEDY, read_expert_map
    from complexity.experiments.report import write_report

    make, problem = BAD_MAPS[kind]
    out = tmp_path / "abl"
    run_ablation(**_tiny_ablation(data_dir, out, steps=2, seeds=1, arms=["routed_mu"]))
    path = out / "runs" / "routed_mu-s0" / "expert_map.npz"
    path.write_bytes(make())
    capsys.readouterr()  # the training's own output
    for call in (lambda: read_expert_map(path.parent), lambda: write_report(out)):
        with pytest.raises(FileFormatError) as info:
            call()
        assert str(info.value).startswith(f"{path}: {problem}") and str(info.value).endswith(f"; {REMEDY}")
    assert main(["ablate", "--report-only", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"complexity ablate: error: {path}: {problem}")
    path.unlink()  # the remedy: the report writes the map again from the weights
    assert main(["ablate", "--report-only", "--out", str(out)]) == 0
    assert read_expert_map(path.parent) is not None
    _assert_png(out / "experts.png")


def test_rerun_refuses_a_done_json_with_a_wrong_value(data_dir, tmp_path):
    """A rerun skips a finished run by reading its done.json: a damaged one stops it, trains nothing."""
    from complexity.data.files import FileFormatError

    out = tmp_path / "abl"
    done = _report_inputs(spike=False)[1]["dense-s0"]
    (out / "runs" / "dense-s0").mkdir(parents=True)
    (out / "runs" / "dense-s0" / "done.json").write_text(json.dumps({**done, "val_loss": "4.49"}))
    with pytest.raises(FileFormatError, match=re.escape("done.json: the field 'val_loss' should be a finite number")):
        run_ablation(**_tiny_ablation(data_dir, out, steps=4, seeds=1, arms=["dense"]))
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["dense-s0"]
    assert sorted(p.name for p in (out / "runs" / "dense-s0").iterdir()) == ["done.json"]
