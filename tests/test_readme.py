"""The README's examples run, and CI runs the README's test command."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("block", re.findall(r"```python\n(.*?)```", README, flags=re.S))
def test_readme_python_examples_run(block):
    exec(compile(block, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command():
    command = subprocess.run(
        ["awk", "/^Set up and run the test suite/{found=1} found && /^```bash/{getline; print; exit}", "README.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert "pip install torch==2.13.0" in command and "pytest" in command
    assert "awk" in (ROOT / ".ci" / "run").read_text()


def test_readme_demo_command_installs_the_demo_extra():
    demo = re.search(r"Set up and run the demo.*?```bash\n(.*?)\n```", README, flags=re.S).group(1)
    assert "'.[demo]'" in demo and demo.rstrip().endswith("softxent demo")
