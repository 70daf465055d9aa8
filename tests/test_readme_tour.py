"""The README's "Try every command" block runs as it stands, from a fresh directory holding only examples/."""

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tour_script() -> str:
    """The first bash block under "## Try every command" in README.md."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Try every command", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_readme_tour_runs(tmp_path):
    script = tour_script()
    assert script.count("llavakit ") >= 15, "the tour should try every command"
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    port = str(free_port())
    (tmp_path / "tour.sh").write_text("set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n"
                                      + script.replace("8000", port))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.Popen(["bash", "tour.sh"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    for made in ("boxes.png", "answers.jsonl", "lora-out/final", "merged/config.json", "tiny-llava/config.json",
                 "tiny-next/config.json"):
        assert (tmp_path / made).exists(), made
    assert '"object":"chat.completion"' in out.replace(" ", ""), out[-2000:]
