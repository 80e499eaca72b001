"""Damaged files in a run folder or an ablation folder: one clear error naming the file, what is
wrong with it and what to do (and following that advice works); a torn last line of a log is
skipped where the log is read; the ablation's report files (and `complexity plot`'s figure) are
replaced whole or not at all. Tiny models, CPU."""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _train_fixtures import make_tiny_data, override_args, run_cli, tiny_overrides  # noqa: E402

from complexity.cli import main as cli_main  # noqa: E402
from complexity.data.files import FileFormatError  # noqa: E402
from complexity.experiments.ablation import run_ablation  # noqa: E402
from complexity.experiments.report import write_report  # noqa: E402
from complexity.experiments.run_files import read_batches  # noqa: E402
from complexity.train import durable, train  # noqa: E402
from complexity.train.config import RunConfig  # noqa: E402
from complexity.train.metrics import read_metrics  # noqa: E402

STEPS = 4
RUN = "runs/dense-s0"  # the ablation's one run, a finished training run folder


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    """A finished one-arm, one-seed ablation (its report written) and its arguments."""
    root = tmp_path_factory.mktemp("run-files")
    _, data = make_tiny_data(root / "data")
    o = tiny_overrides(data)
    for k in ("model.preset", "data.path", "training.max_steps"):
        o.pop(k)
    o.update({"checkpoint.every": 2, "eval.every": 2, "eval.max_batches": 2})
    kw = dict(preset="tiny", data=data, steps=STEPS, seeds=1, arms=["dense"], overrides=override_args(o))
    out = root / "abl"
    run_ablation(**kw, out=out, progress=False, log=lambda m: None)
    assert (out / RUN / "done.json").is_file() and (out / "results.md").is_file()
    return out, kw


@pytest.fixture
def copy(ablation, tmp_path):
    """A copy of the finished ablation folder, to damage; -> (folder, run_ablation's arguments)."""
    out, kw = ablation
    shutil.copytree(out, tmp_path / "abl")
    return tmp_path / "abl", {**kw, "out": tmp_path / "abl", "progress": False, "log": lambda m: None}


def _run_config(run: Path) -> RunConfig:
    return RunConfig.from_dict(json.loads((run / "resolved.json").read_text()))


def _cli_error(capsys, *argv) -> str:
    """Run the CLI in-process: exit code 2 and one line, no traceback -> the line."""
    capsys.readouterr()
    assert cli_main([str(a) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"complexity {argv[0]}: error: "), lines
    return lines[0]


# Ways to damage a JSON file -> what the error says about it.
DAMAGE = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "not valid JSON"),
    "empty": (lambda p: p.write_bytes(b""), "empty file"),
    "not UTF-8": (lambda p: p.write_bytes(b'{"a": "\xff\xfe"}'), "not UTF-8"),
    "a list": (lambda p: p.write_text("[1, 2]"), "expected a JSON object, found list"),
}


# ----------------------------------------------------------------------------- a training run folder


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_resolved_json_on_resume(copy, capsys, kind):
    out, _ = copy
    run = out / RUN
    config = _run_config(run)
    damage, what = DAMAGE[kind]
    damage(run / "resolved.json")
    with pytest.raises(FileFormatError) as info:
        train(config, out_dir=run, resume=True)
    message = str(info.value)
    assert str(run / "resolved.json") in message and what in message, message
    assert "--overwrite" in message  # what the user can do
    (out.parent / "cfg.json").write_text(json.dumps(config.to_dict()))
    line = _cli_error(capsys, "train", "--out", run, "--resume", "--config", out.parent / "cfg.json")
    assert f"{run / 'resolved.json'}: " in line and what in line and "--overwrite" in line


@pytest.mark.parametrize("kind", ["truncated", "a list", "no field"])
def test_damaged_summary_json_of_a_finished_run(copy, kind):
    out, _ = copy
    run = out / RUN
    config = _run_config(run)
    before = read_metrics(run)
    summary = run / "summary.json"
    if kind == "no field":
        summary.write_text(json.dumps({"step": STEPS}))
        what = "the field 'interrupted' is missing"
    else:
        DAMAGE[kind][0](summary)
        what = DAMAGE[kind][1]
    with pytest.raises(FileFormatError) as info:
        train(config, out_dir=run, resume=True)
    message = str(info.value)
    assert str(summary) in message and what in message and "delete it" in message, message

    # The advice works: without summary.json the run's end is redone, no step is trained again.
    summary.unlink()
    result = train(config, out_dir=run, resume=True)
    assert result.step == STEPS and not result.interrupted and result.losses == {}
    assert json.loads(summary.read_text())["interrupted"] is False
    assert read_metrics(run) == before


def test_damaged_metrics_line_names_file_and_line_and_torn_tail_is_skipped(copy):
    out, _ = copy
    path = out / RUN / "metrics.jsonl"
    good = read_metrics(path)
    lines = path.read_text().splitlines(keepends=True)

    path.write_text("".join(lines) + '{"step": 5, "loss": 3.1')  # a kill in the middle of a write
    assert read_metrics(path) == good

    for bad, what in (('{"step": 2, "lo\n', "not a JSON record"), ("[2]\n", "not a JSON object")):
        path.write_text(lines[0] + bad + "".join(lines[1:]))
        with pytest.raises(FileFormatError, match=rf"^{path}:2: {what} \(the file is damaged\)$"):
            read_metrics(path)
    path.write_text(lines[0] + '{"loss": 2.0}\n' + "".join(lines[1:]))
    with pytest.raises(FileFormatError, match=rf'^{path}:2: a record without an integer "step"'):
        read_metrics(path)


def test_damaged_batches_line(copy):
    out, _ = copy
    run = out / RUN
    good = read_batches(run)
    assert len(good) == STEPS * 2
    path = run / "batches.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines) + '{"step": 5, "mi')
    assert read_batches(run) == good
    for bad, what in (("{oops\n", "not a JSON record"), ('{"step": 1}\n', "not a batch record")):
        path.write_text(lines[0] + bad + "".join(lines[1:]))
        with pytest.raises(FileFormatError, match=rf"^{path}:2: {what} \(the file is damaged\)$"):
            read_batches(run)


# ----------------------------------------------------------------------------- an ablation folder


@pytest.mark.parametrize("kind", ["truncated", "not UTF-8", "a list"])
def test_damaged_ablation_json(copy, capsys, kind):
    out, kw = copy
    damage, what = DAMAGE[kind]
    damage(out / "ablation.json")
    for call in (lambda: run_ablation(**kw), lambda: write_report(out)):
        with pytest.raises(FileFormatError) as info:
            call()
        message = str(info.value)
        assert str(out / "ablation.json") in message and what in message, message
        assert "rerun the exact command" in message
    line = _cli_error(capsys, "ablate", "--report-only", "--out", out)
    assert str(out / "ablation.json") in line and what in line


@pytest.mark.parametrize(
    "edit,what",
    [
        (lambda m: m.pop("identity"), "the field 'identity' is missing"),
        (lambda m: m.update(identity=[1]), "the field 'identity' should be an object, found [1]"),
    ],
)
def test_ablation_json_without_its_plan_identity(copy, edit, what):
    out, kw = copy
    meta = json.loads((out / "ablation.json").read_text())
    edit(meta)
    (out / "ablation.json").write_text(json.dumps(meta))
    with pytest.raises(FileFormatError, match="^" + re.escape(f"{out / 'ablation.json'}: {what}; ")):
        run_ablation(**kw)


@pytest.mark.parametrize(
    "edit,what",
    [
        (lambda m: m.pop("arms"), "the field 'arms' is missing"),
        (lambda m: m.update(steps="4"), "the field 'steps' should be an integer, found '4'"),
        (lambda m: m["plan"].pop("dense"), "arm 'dense' has no plan"),
        (lambda m: m["plan"]["dense"].pop("total"), "the plan of arm 'dense': the field 'total' is missing"),
    ],
)
def test_report_names_the_missing_field(copy, capsys, edit, what):
    out, _ = copy
    meta = json.loads((out / "ablation.json").read_text())
    edit(meta)
    (out / "ablation.json").write_text(json.dumps(meta))
    line = _cli_error(capsys, "ablate", "--report-only", "--out", out)
    assert what in line and str(out / "ablation.json") in line, line


def test_report_of_a_folder_without_ablation_json(tmp_path, capsys):
    line = _cli_error(capsys, "ablate", "--report-only", "--out", tmp_path)
    assert line.endswith(f"{tmp_path}: no ablation.json (not an ablation folder)")


@pytest.mark.parametrize("kind", ["truncated", "empty", "a list", "no field"])
def test_damaged_done_json(ablation, copy, capsys, kind):
    out, kw = copy
    done = out / RUN / "done.json"
    original = json.loads(done.read_text())
    metrics = (out / RUN / "metrics.jsonl").read_bytes()
    if kind == "no field":
        done.write_text(json.dumps({k: v for k, v in original.items() if k != "train_command"}))
        what = "the field 'train_command' is missing"
    else:
        DAMAGE[kind][0](done)
        what = DAMAGE[kind][1]
    for call in (lambda: run_ablation(**kw), lambda: write_report(out)):
        with pytest.raises(FileFormatError) as info:
            call()
        message = str(info.value)
        assert str(done) in message and what in message and "delete it" in message, message
    assert what in _cli_error(capsys, "ablate", "--report-only", "--out", out)

    # The advice works: the run is summarised again from its folder, not trained again.
    done.unlink()
    trained = []
    result = run_ablation(**kw, on_run_end=lambda arm, seed, s: trained.append(arm))
    assert trained == ["dense"] and not result.interrupted
    source = str(ablation[0])  # the folder copied: its path is in the train command
    assert json.loads(done.read_text()) == {
        **original,
        "train_command": original["train_command"].replace(source, str(out)),
    }
    assert (out / RUN / "metrics.jsonl").read_bytes() == metrics


def test_damaged_run_metrics_in_the_report(copy, capsys):
    out, _ = copy
    path = out / RUN / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines) + '{"step": 9, "lo')  # torn last line: tolerated
    write_report(out)
    path.write_text(lines[0] + "{oops\n" + "".join(lines[1:]))
    line = _cli_error(capsys, "ablate", "--report-only", "--out", out)
    assert f"{path}:2: not a JSON record" in line and f"remove the run folder {out / RUN}" in line


# ----------------------------------------------------------------------------- atomic report files


def test_report_files_are_replaced_whole(copy):
    """results.md and the figures go through durable.write_atomic: an error (or a kill) before the
    rename leaves the previous file as it was, and no temporary file once written again."""
    out, _ = copy
    (out / "results.md").write_text("the previous report\n")
    old_png = (out / "loss.png").read_bytes()
    reached = []

    def crash(point):
        reached.append(point)
        raise RuntimeError(f"crash at {point}")

    durable.fault_hook = crash
    try:
        with pytest.raises(RuntimeError, match="crash at report.results_md"):
            write_report(out)
    finally:
        durable.fault_hook = None
    assert (out / "results.md").read_text() == "the previous report\n"
    assert not list(out.glob("*.partial"))

    assert reached == ["report.results_md"] and (out / "loss.png").read_bytes() == old_png

    path, figures = write_report(out)
    assert path.read_text().startswith("# Ablation: tiny") and figures == [out / "loss.png"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(out.glob("*.partial"))


@pytest.mark.parametrize("point", ["report.results_md", "plot.figure"])
def test_kill_while_writing_the_report_keeps_the_previous_files(copy, point):
    out, _ = copy
    (out / "results.md").write_text("the previous report\n")
    (out / "loss.png").write_bytes(b"the previous figure")
    killed = run_cli(["ablate", "--report-only", "--out", str(out)], env={durable.KILL_ENV: point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    if point == "report.results_md":
        assert (out / "results.md").read_text() == "the previous report\n"
    else:  # results.md is written first, then the figure
        assert (out / "results.md").read_text().startswith("# Ablation: tiny")
    assert (out / "loss.png").read_bytes() == b"the previous figure"

    done = run_cli(["ablate", "--report-only", "--out", str(out)])
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "results.md").read_text().startswith("# Ablation: tiny")
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.partial"))


def test_plot_command_writes_its_figure_whole(copy, tmp_path):
    out, _ = copy
    figure = tmp_path / "curves" / "loss.png"
    assert cli_main(["plot", str(out / RUN), "--out", str(figure)]) == 0
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(figure.parent.glob("*.partial"))
