"""The README's Quick start is what CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands():
    text = (ROOT / "README.rst").read_text()
    block = text.split("Quick start", 1)[1].split(".. code-block:: bash", 1)[1]
    lines = [line.strip() for line in block.strip("\n").splitlines()]
    commands = []
    for line in lines:
        if not line:
            if commands:
                break
            continue
        commands.append(line)
    return commands


def test_quick_start_has_two_commands_and_ci_runs_the_second_verbatim():
    commands = _quick_start_commands()
    assert len(commands) == 2
    assert "python -m skmml.demo" in commands[0]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci
