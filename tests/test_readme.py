"""Every command block of the README, run as printed in a fresh clone (after the set-up commands it names).

It takes about half an hour (the set-up is `make demo`), so it runs only with LMREFINERY_README_TEST=1:
    LMREFINERY_README_TEST=1 .venv/bin/python -m pytest tests/test_readme.py
`make test` itself is skipped inside it (this test is part of `make test`).
"""

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.splitlines():
            command = line.split("  #")[0].strip()
            if command and not command.startswith("#") and command != "make test":
                commands.append(command)
    return commands


def test_the_readme_has_command_blocks():
    commands = readme_commands()
    assert "make demo" in commands and any(c.startswith("lmrefinery ") for c in commands)


@pytest.mark.skipif(not os.environ.get("LMREFINERY_README_TEST"), reason="≈ 30 min: set LMREFINERY_README_TEST=1")
def test_every_readme_command_works_as_printed_in_a_fresh_clone(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "LMREFINERY_README"))}
    environment["PATH"] = os.pathsep.join(p for p in environment["PATH"].split(os.pathsep) if ".venv" not in p)
    # one shell, so `. .venv/bin/activate` carries over; each command's wall time is printed (pytest -s shows it)
    timed = [f'start=$SECONDS; {command}; echo "README-TIME $((SECONDS - start)) s:" {shlex.quote(command)}'
             for command in readme_commands()]
    script = "set -e\n" + "\n".join(timed) + "\n"
    result = subprocess.run(["bash", "-c", script], cwd=clone, env=environment, capture_output=True, text=True)
    print("\n".join(line for line in result.stdout.splitlines() if line.startswith("README-TIME")))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
