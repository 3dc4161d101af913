"""The README must stay true: every flag documented, and CI running the README's test command."""
import dataclasses
import json
import re
from pathlib import Path

import grpo_from_scratch as grpo

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_flag_is_in_the_readme_table_with_its_default():
    rows = dict(re.findall(r"^\| `--(\w+)` \| ([^|]+) \|", README, flags=re.M))
    for field in dataclasses.fields(grpo.Config):
        assert field.name in rows, f"--{field.name} missing from the README flag table"
        documented = rows[field.name].strip().strip("`")
        expected = "unset" if field.default is None else str(field.default)
        assert documented == expected, f"--{field.name}: README says {documented!r}, Config says {expected!r}"
    assert set(rows) == {f.name for f in dataclasses.fields(grpo.Config)}, "README lists a flag Config does not have"


def test_ci_runs_the_readme_test_command():
    command = "python -m pytest tests"
    assert f"```bash\n{command}\n```" in README
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines
    assert "pip install -r requirements.txt" in README and any("-r requirements.txt" in line for line in ci_lines)


def test_help_lists_every_flag():
    """`python grpo_from_scratch.py --help`, as README gives it: exits 0 and lists every Config field
    (argparse %-formats help texts, so one stray percent sign used to crash it)."""
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "grpo_from_scratch.py", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for field in dataclasses.fields(grpo.Config):
        assert f"--{field.name}" in result.stdout, f"--{field.name} missing from --help"


def readme_commands(prefix: str) -> list[str]:
    """The README's shell commands (in ```bash blocks, continuation lines joined) that start with prefix."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("  #")[0].strip()
            if command.startswith(prefix):
                commands.append(command)
    return commands


def test_readme_training_commands_run(tmp_path, monkeypatch, capsys):
    """Every `python grpo_from_scratch.py ...` command of the README (the quickstart, the reward-file example,
    the DAPO and GSPO recipes) runs as written: its flags, after the flags of a one-step offline run on the
    tiny model (which they override), so every flag it names is real and its values are accepted."""
    import shlex
    import tiny
    commands = readme_commands("python grpo_from_scratch.py")
    assert len(commands) >= 4, commands
    python_blocks = re.findall(r"```python\n(# my_rewards\.py\n.*?)```", README, flags=re.S)
    (tmp_path / "my_rewards.py").write_text(python_blocks[0])  # the example file, as the README shows it
    monkeypatch.chdir(tmp_path)  # where its command finds my_rewards.py
    inputs = tiny.write_run_inputs(tmp_path)
    for number, command in enumerate(commands):
        flags = shlex.split(command)[2:]
        base = tiny.run_args(inputs, tmp_path / "out", run_name=f"readme{number}", num_steps=1, eval_steps=0,
                             max_completion_length=96, eval_max_new_tokens=8)
        summary = grpo.main(base + flags)
        assert summary["steps"] == 1, command
        config = json.loads((tmp_path / "out" / f"readme{number}" / "config.json").read_text())
        asked, default = grpo.parse_config(flags), grpo.Config()
        for field in dataclasses.fields(grpo.Config):  # the run used every value the command sets
            if getattr(asked, field.name) != getattr(default, field.name):
                assert config[field.name] == getattr(asked, field.name), (command, field.name)
    capsys.readouterr()


def test_readme_memory_table_is_what_the_script_prints():
    """README's memory table is the output of `python tests/memory_budget.py`, the command it names."""
    import subprocess
    import sys
    assert "python tests/memory_budget.py" in README
    result = subprocess.run([sys.executable, "tests/memory_budget.py"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert len(table) >= 6 and "\n".join(table) in README


def test_readme_learning_margins_are_what_the_script_prints():
    """README's table of learning-test figures over seeds, CPU kernel paths and releases, and the
    bounds' distances, are the output of the summary command it gives, on the measurements committed
    in tests/assets, with the test's current bounds."""
    import subprocess
    import sys
    command = "python tests/learning_margins.py --summary tests/assets/learning_margins.jsonl"
    assert command in readme_commands("python tests/learning_margins.py")
    result = subprocess.run([sys.executable, *command.split()[1:]], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("|")]
    claims = [line for line in result.stdout.splitlines() if line.startswith("- ")]
    assert len(table) >= 14 and len(claims) == 6, result.stdout
    assert "\n".join(table) in README and "\n".join(claims) in README
