"""The `moesys` command: every subcommand imports and prints its help; an unknown one is a clear error."""

import pytest

from moesys.cli import _COMMANDS, main


@pytest.mark.parametrize("command", sorted(_COMMANDS))
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert f"moesys {command}" in capsys.readouterr().out


def test_top_level_help_and_unknown_command(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert all(c in out for c in _COMMANDS)
    with pytest.raises(SystemExit) as e:
        main(["bogus"])
    assert e.value.code == 2
    assert "unknown command 'bogus'" in capsys.readouterr().err
