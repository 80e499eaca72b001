"""`complexity --help` answers without importing torch; `import complexity` still registers the
Auto classes, and the command registers them itself once its arguments are parsed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from complexity.cli import COMMAND_MODULES

# The installed console script (pip writes it next to the interpreter of the environment).
SCRIPT = Path(sys.executable).parent / "complexity"
COMMANDS = [name.rsplit(".", 1)[1] for name in COMMAND_MODULES]
# What no --help may import: each costs a fraction of a second to seconds before the usage shows.
HEAVY = ("torch", "transformers", "numpy")


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the console script as a user would, with the import log (-X importtime) on stderr."""
    assert SCRIPT.is_file(), f"{SCRIPT}: the `complexity` console script is not installed (pip install -e .)"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-X", "importtime", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def imported_modules(importtime_log: str) -> set[str]:
    """Module names from `-X importtime` lines ("import time: self | cumulative | name")."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime_log.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("args", [["--help"], *[[c, "--help"] for c in COMMANDS]], ids=lambda a: " ".join(a))
def test_help_does_not_import_torch(args):
    for result in (run_script(*args), run_python("-X", "importtime", "-m", "complexity.cli", *args)):
        assert result.returncode == 0, result.stderr[-2000:]
        assert "usage: complexity" in result.stdout
        heavy = imported_modules(result.stderr) & set(HEAVY)
        assert not heavy, f"`complexity {' '.join(args)}` imported {sorted(heavy)}"


def run_python(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)


# Runs the commands given as JSON in argv[1] in one interpreter, then checks what was imported:
# never torch, nor transformers' Auto classes (which import it).
RUN_WITHOUT_TORCH = """
import json, sys
from complexity.cli import main

for argv in json.loads(sys.argv[1]):
    assert main(argv) == 0, argv
heavy = [m for m in ("torch", "transformers.models.auto") if m in sys.modules]
assert not heavy, f"imported {heavy}"
"""


def _transformers_tokenizer_imports_torch() -> bool:
    """Whether transformers' own PreTrainedTokenizerFast imports torch (transformers 5.17 does,
    through its GGUF helpers; later releases do not)."""
    probe = "import sys; from transformers import PreTrainedTokenizerFast; print('torch' in sys.modules)"
    result = run_python("-c", probe)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip() == "True"


def test_data_tokenizer_and_plot_commands_do_not_import_torch(tmp_path):
    """`complexity tokenizer train`, `data prepare` (in-process and with worker processes), `data
    inspect`, `data builtin` on a tiny corpus and `plot` of a run's metrics, in one fresh
    interpreter: none imports torch. (`tokenizer train` saves through transformers'
    PreTrainedTokenizerFast: where that class itself imports torch, the command runs apart.)"""
    from data_fixtures import write_corpus

    corpus = write_corpus(tmp_path / "corpus", n_txt=2, n_jsonl_docs=30)
    inputs = [str(p) for p in (*corpus["txt"], corpus["jsonl"])]
    tok, data = str(tmp_path / "tok"), str(tmp_path / "data")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(f'{{"step": {s}, "loss": {6.0 - s / 10}}}\n' for s in range(1, 21)))
    prepare = ["data", "prepare", "--input", *inputs, "--tokenizer", tok, "--val-fraction", "0.1", "--no-progress"]
    train_tokenizer = ["tokenizer", "train", "--input", *inputs, "--vocab-size", "300", "--out", tok, "--no-progress"]
    apart = _transformers_tokenizer_imports_torch()
    if apart:
        result = run_python(
            "-c", "import sys; from complexity.cli import main; sys.exit(main(sys.argv[1:]))", *train_tokenizer
        )
        assert result.returncode == 0 and "saved tokenizer (vocab" in result.stdout, result.stderr[-3000:]
    commands = [
        *([] if apart else [train_tokenizer]),
        [*prepare, "--out", data],
        [*prepare, "--out", str(tmp_path / "data-workers"), "--workers", "2"],
        ["data", "inspect", data, "--tokenizer", tok],
        ["data", "builtin"],
        ["plot", str(run), "--out", str(tmp_path / "loss.png")],
    ]
    result = run_python("-c", RUN_WITHOUT_TORCH, json.dumps(commands))
    assert result.returncode == 0, result.stderr[-3000:]
    assert apart or "saved tokenizer (vocab" in result.stdout
    assert "documents, vocab" in result.stdout
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_info_lists_the_presets_for_an_unknown_name():
    # `info --help` stays torch-free, so the preset names come with the error for a wrong one.
    result = run_script("info", "no-such-preset")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "tiny" in result.stderr and "tmlr-187m" in result.stderr and "pacific-prime" in result.stderr


# What a fresh interpreter imports before using the Auto classes: transformers' modules whose own
# imports load the Auto classes half-way (the registration must wait until they are complete), our
# model module on its own, transformers first.
IMPORT_ORDERS = {
    "auto classes": "",
    "PreTrainedModel first": "from transformers import PreTrainedModel\n",
    "GenerationMixin first": "from transformers import GenerationMixin\n",
    "AutoTokenizer first": "from transformers import AutoTokenizer\n",
    "our model module": "from complexity.modeling_complexity import ComplexityForCausalLM\n",
    # a module the model file imports, first: it imports the config, which must not register (and
    # so import the model file) while this module is half initialized
    "hash_routing first": "import complexity.hash_routing\n",
    "the kernels first": "import complexity.complexity_kernels\n",
}


@pytest.mark.parametrize("first", list(IMPORT_ORDERS))
def test_import_complexity_registers_the_auto_classes(tmp_path_factory, first):
    """In a fresh interpreter, `import complexity` (which imports neither torch nor transformers)
    is enough for AutoModelForCausalLM to load our folders as our class (not a trust_remote_code
    copy), whatever is imported next; and a folder saved there carries the trust_remote_code
    files and auto_map."""
    from _serve_fixtures import make_tiny_checkpoint

    ckpt = tmp_path_factory.getbasetemp() / "registers"
    if not ckpt.exists():
        make_tiny_checkpoint(ckpt)
    saved = tmp_path_factory.mktemp("saved")
    code = (
        "import sys\n"
        "import complexity\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        + IMPORT_ORDERS[first]
        + "from transformers import AutoConfig, AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(ckpt)!r})\n"
        f"model.save_pretrained({str(saved)!r})\n"
        "print(type(model).__module__, type(model).__name__, type(AutoConfig.for_model('complexity')).__name__)\n"
        "assert not [f for f in sys.meta_path if 'complexity' in type(f).__module__]  # the watcher is gone\n"
    )
    result = run_python("-c", code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["complexity.modeling_complexity", "ComplexityForCausalLM", "ComplexityConfig"]
    config = json.loads((saved / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_complexity.ComplexityForCausalLM"
    assert (saved / "modeling_complexity.py").is_file() and (saved / "configuration_complexity.py").is_file()


def test_the_command_registers_after_parsing(tmp_path):
    """`complexity generate` loads through AutoModelForCausalLM: the registration deferred by
    `import complexity` must have happened before the command loads the checkpoint."""
    from _serve_fixtures import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    result = run_script(
        "generate",
        str(ckpt),
        "--prompt",
        "hello",
        "--max-new-tokens",
        "3",
        "--temperature",
        "0",
        "--threads",
        "1",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torch" in imported_modules(result.stderr)  # the command itself does need it


def test_overrides_written_after_an_option_are_overrides(capsys):
    """argparse gives a nargs="*" positional only the words before the first option: KEY=VALUE
    after one (`train --preset tiny --max-steps 5 training.seq_len=256`) must still be overrides."""
    from complexity.cli import main

    assert main(["info", "tiny", "--json", "num_experts=2"]) == 0
    assert '"num_experts": 2' in capsys.readouterr().out
    # the override after --max-steps reaches the recipe: its check fires before any data is read
    assert main(["train", "--preset", "tiny", "--max-steps", "1", "training.seq_len=0"]) == 2
    assert "training.seq_len: must be a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # anything else left unparsed is still refused
        main(["info", "tiny", "--json", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
