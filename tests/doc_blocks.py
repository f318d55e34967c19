"""The fenced `sh` blocks of docs/operations.md that a test runs as written: a block marked
`<!-- TAG: step NAME -->` is run by bash -euo pipefail with only documented placeholders
substituted (tests/test_deployment.py: deploy-test; tests/test_cluster_up.py: cluster-test)."""

import re
import subprocess
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "operations.md"


def doc_steps(tag: str) -> dict[str, str]:
    """Each block of the doc marked with `tag`, by step name."""
    found = re.findall(rf"<!-- {re.escape(tag)}: step ([\w-]+) -->\n```sh\n(.*?)```",
                       DOC.read_text(), re.S)
    return dict(found)


def run_block(text: str, cwd: Path, subs: dict[str, str], env: dict[str, str],
              timeout: float = 120, ok: tuple[int, ...] = (0,)) -> str:
    for old, new in subs.items():
        text = text.replace(old, new)
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", text], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode in ok, f"doc block failed:\n{text}\n{run.stdout}\n{run.stderr}"
    return run.stdout
