"""The README's set-up stays true: exactly two commands, and CI runs the same test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set-up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_two_setup_commands_main_job_then_tests():
    main_job, tests = setup_commands()
    assert "mambaify distill --teacher smollm2-135m-instruct" in main_job
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command():
    _, tests = setup_commands()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci_lines
