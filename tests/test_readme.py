"""The README must stay true: every flag documented, and CI running the README's test command."""
import dataclasses
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
