"""The `moesys` command through main(argv) and as a process: help with descriptions and defaults for every
option, --version, one error style (one line `moesys CMD: error: ...`, exit 2) for every subcommand, one
line for Ctrl-C, and `moesys config --show` against the config schema."""

import argparse
import importlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from moesys import __version__
from moesys.cli import _COMMANDS, command_parser, guarded, main
from moesys.config import Config, config_from_dict

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")


@pytest.mark.parametrize("command", sorted(_COMMANDS))
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert f"moesys {command}" in capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(_COMMANDS))
def test_every_option_has_a_description_and_shows_its_default(command):
    parser = command_parser(command)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"moesys {command} {action.option_strings or action.dest}: no description"
        shown = formatter._get_help_string(action)
        if action.option_strings and not action.required:
            assert "%(default)" in shown or "default" in shown, (command, action.option_strings)
        assert shown.count("(default:") <= 1, (command, shown)  # the default said once
        if action.option_strings and action.nargs == 0:   # a flag: off unless given, never "True"/"False"
            assert shown.endswith("(default: off)"), (command, shown)
    text = parser.format_help()
    assert "(default: " in text or command == "plot" and "(default: None)" in text


def test_top_level_help_version_and_unknown_command(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert all(c in out for c in _COMMANDS)
    with pytest.raises(SystemExit) as e:
        main(["bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown command 'bogus'" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"moesys {__version__}"


def _one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"moesys {command}: error: "), err
    return lines[0]


@pytest.mark.parametrize("argv,needle", [
    (["train", "--config", TINY, "--set", "train.stepz=3"], "did you mean 'train.steps'"),
    (["train", "--config", "no/such.yaml"], "no/such.yaml does not exist"),
    (["train", "--config", TINY, "--set", "train.lr=abc"], "train.lr"),     # a multi-line config error
    (["train"], "--config"),                                                 # argparse: required option
    (["generate", "{tmp}", "--prompt", "x", "--gpu-memory=-1GiB"], "--gpu-memory='-1GiB'"),
    (["generate", "{tmp}/nothing", "--prompt", "x", "--gpu-memory=1GiB"], "not a directory"),
    (["generate", "{tmp}", "--prompt", "x", "--token-ids", "1", "--gpu-memory=1GiB"], "not allowed with"),
    (["upcycle", "{tmp}/nothing", "{tmp}/out", "--num-experts", "4", "--top-k", "2"], "not a directory"),
    (["upcycle", "{tmp}", "{tmp}/out", "--num-experts", "four", "--top-k", "2"], "invalid int value"),
    (["export", "{tmp}", "{tmp}/out"], "neither a checkpoint directory"),
    (["plot", "{tmp}"], "metrics.jsonl does not exist"),
    (["config", "--show", "{tmp}/none.yaml"], "none.yaml does not exist"),
    (["config"], "pass --show"),
])
def test_every_subcommand_reports_bad_input_in_one_line(argv, needle, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:     # argparse's own errors exit from parse_args
        code = e.code
    assert code == 2
    line = _one_error_line(capsys.readouterr().err, argv[0])
    assert needle in line, line


@pytest.mark.parametrize("command,module,function,argv", [
    ("export", "moesys.export", "export", ["{tmp}", "{tmp}/out"]),
    ("upcycle", "moesys.upcycling", "upcycle", ["{tmp}", "{tmp}/out", "--num-experts", "4", "--top-k", "2"]),
    ("plot", "moesys.plot", "plot_run", ["{tmp}"]),
])
def test_a_multi_line_error_is_one_line_in_every_command(command, module, function, argv, tmp_path, capsys,
                                                         monkeypatch):
    """A config error lists each bad key on its own line (a run's manifest.json read by export, say); every
    command joins them through cli.one_line, as train and config do."""
    def fail(*args, **kwargs):
        raise ValueError("manifest.json: invalid config\n  train.steps: bad\n  train.lr: bad")

    monkeypatch.setattr(importlib.import_module(module), function, fail)
    assert main([command, *(a.replace("{tmp}", str(tmp_path)) for a in argv)]) == 2
    line = _one_error_line(capsys.readouterr().err, command)
    assert line == f"moesys {command}: error: manifest.json: invalid config; train.steps: bad; train.lr: bad"


def test_generate_on_random_bytes_as_safetensors_is_one_line(tmp_path, capsys):
    """A model file that is no safetensors (a failed copy, a wrong file): its 8 first bytes read as a header
    length of exabytes. The header is checked against the file size, not read: one line naming the file."""
    from transformers import MixtralConfig
    MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, num_local_experts=2).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(random.Random(0).randbytes(4096))
    assert main(["generate", str(tmp_path), "--token-ids", "1,2", "--gpu-memory", "1GiB"]) == 2
    line = _one_error_line(capsys.readouterr().err, "generate")
    assert f"{tmp_path / 'model.safetensors'} is not a readable safetensors file" in line, line
    assert line.endswith("re-download or re-export the model"), line


@pytest.mark.parametrize("argv,needle", [([], "--config"), (["--config", TINY, "--bogus"], "--bogus"),
                                          (["--config", "no/such.yaml"], "no/such.yaml does not exist")])
def test_the_module_entry_point_reports_as_moesys_train(argv, needle, capsys):
    """`torchrun -m moesys.train` / `python -m moesys.train`: argparse's errors and the job's own carry one
    prefix, `moesys train: error:`, as through `moesys train`."""
    from moesys.train import main as train_main
    try:
        code = train_main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    assert needle in _one_error_line(capsys.readouterr().err, "train")


@pytest.mark.slow
def test_generate_bad_budget_as_a_process_is_one_line(tmp_path):
    """The command a user types: no traceback, exit code 2."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "moesys.cli", "generate", str(tmp_path), "--prompt", "x",
                           "--gpu-memory=-1GiB"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    _one_error_line(proc.stderr, "generate")


def test_interrupt_and_errors_in_guarded_are_one_line(capsys, monkeypatch):
    def interrupted():
        raise KeyboardInterrupt

    assert guarded("moesys x", interrupted) == 130
    assert capsys.readouterr().err == "moesys x: interrupted\n"

    def terminated():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        return 0

    assert guarded("moesys x", terminated) == 143
    assert capsys.readouterr().err == "moesys x: terminated (SIGTERM)\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored

    def bug():
        raise ValueError("bad value")

    monkeypatch.setenv("MOESYS_TRACEBACK", "1")
    with pytest.raises(ValueError):
        guarded("moesys x", bug)
    monkeypatch.delenv("MOESYS_TRACEBACK")
    assert guarded("moesys x", bug) == 2
    assert capsys.readouterr().err == "moesys x: error: bad value\n"


@pytest.mark.slow
def _default_sigint() -> None:
    """In the child before exec: a shell that starts a job in the background without job control (CI may
    run the suite so) sets SIGINT to ignored, children inherit that, and Python then installs no
    KeyboardInterrupt handler: the real Ctrl-C this test sends would be ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_ctrl_c_in_a_running_command_prints_one_line(tmp_path):
    """A real SIGINT to `moesys upcycle` blocked inside the command (a FIFO as the dense config.json)."""
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "moesys.cli", "upcycle", str(tmp_path), str(tmp_path / "out"),
                             "--num-experts", "4", "--top-k", "2"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    writer = None
    try:
        deadline = time.monotonic() + 60
        while writer is None and time.monotonic() < deadline:
            try:  # succeeds once the command has the FIFO open for reading; it then waits in read()
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.1)
        assert writer is not None, "the command never opened its config file"
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            # Linux may hand a process-wide SIGINT to one of torch's threads; Python then raises it in the main
            # thread when that thread's blocked read() returns, which a real file's read always does, but this
            # FIFO's only does at EOF (seen once in CI: the read outlived the 60 s wait)
            os.close(writer)
            writer = None
            _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        if writer is not None:
            os.close(writer)
    assert proc.returncode == 130, err
    assert err == "moesys upcycle: interrupted\n"


# What the console script `moesys` (pyproject.toml: moesys = "moesys.cli:main") runs.
_CONSOLE_SCRIPT = "import sys; from moesys.cli import main; sys.exit(main())"


def _torch_is_loading(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_the_entry_point_imports_nothing_heavy():
    """`moesys` runs `from moesys.cli import main` before main's handlers are active: it must not load torch."""
    code = "import sys, moesys.cli; heavy = {'torch', 'transformers'} & set(sys.modules); assert not heavy, heavy"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_ctrl_c_while_the_command_starts_prints_one_line(tmp_path):
    """A real SIGINT while `moesys train` is still importing torch (its first seconds, before any subcommand
    code runs): one line and 130, as later, not a KeyboardInterrupt traceback from an import."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _CONSOLE_SCRIPT, "train", "--config", TINY,
                             "--run-dir", str(tmp_path / "run")], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 60
        while not _torch_is_loading(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _torch_is_loading(proc.pid), "torch never started loading"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert (proc.returncode, err) == (130, "moesys train: interrupted\n"), err


def test_a_reader_gone_from_stdout_is_quiet():
    """`moesys config --show | head`: the reader leaves before the output is written. The command exits as
    one killed by SIGPIPE does (141, like 130 and 143 here: 128 + the signal), saying nothing, not
    `error: [Errno 32] Broken pipe` nor Python's "Exception ignored" at exit."""
    read_end, write_end = os.pipe()
    os.close(read_end)   # the reader has gone before the command writes a byte
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run([sys.executable, "-c", _CONSOLE_SCRIPT, "config", "--show"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=REPO, timeout=120)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (141, "")


def test_output_still_buffered_for_a_gone_reader_is_dropped_quietly(monkeypatch, capsys):
    """A short output waits in stdout's buffer until the command ends: guarded flushes it, and when the reader
    has gone points stdout at /dev/null, so Python's own flush at exit has nothing left to fail on."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    stdout = open(write_end, "w")
    monkeypatch.setattr(sys, "stdout", stdout)
    try:
        assert guarded("moesys x", lambda: print("a line that stays in the buffer")) == 141
        stdout.flush()   # what the interpreter does at exit: no BrokenPipeError left
    finally:
        stdout.close()
    assert capsys.readouterr().err == ""


def test_config_show_prints_the_whole_schema(capsys):
    assert main(["config", "--show"]) == 0
    out = capsys.readouterr().out
    assert config_from_dict(yaml.safe_load(out)) == Config()   # valid YAML holding every default
    lines = out.splitlines()
    assert "  cpu_threads: null  # int | null; torch intra-op threads on the CPU" in "\n".join(lines)
    assert any(line.startswith("  dtype: \"auto\"  # \"auto\" | \"float32\" | \"bfloat16\"; auto:") for line in lines)
    n_fields = sum(1 for line in lines if "  # " in line and not line.rstrip().endswith(":"))
    assert n_fields >= 80
    # Every key says what it means: a leaf line is `key: value  # type; description` (init_from, hf_model
    # and the shape keys included), and every section line carries its docstring or has keys below it.
    leaves = [line for line in lines if not line.split("#", 1)[0].rstrip().endswith(":")]
    assert [line for line in leaves if "; " not in line.split("  # ", 1)[1]] == []


def test_config_show_with_a_file_shows_its_values_and_the_defaults(capsys):
    assert main(["config", "--show", TINY, "--set", "train.steps=7"]) == 0
    out = capsys.readouterr().out
    assert "  steps: 7  # int; default 20" in out
    assert "  num_experts: 4  # int; default 8" in out
    assert "  top_k: 2  # int; experts per token\n" in out   # equal to its default: no note
