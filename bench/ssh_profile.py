"""Where gatewayd spends its time during a tunnel transfer: py-spy, sampled from outside.

``bench_ssh.py --py-spy DIR`` records the gatewayd process with py-spy (from PyPI, in its
own virtualenv under .venv-tools/py-spy, installed on first use) while each of its bulk
transfers runs, writes the collapsed stacks (``DIR/<cipher>-<round>.txt``, flamegraph.pl
and speedscope read them) and prints the functions with the most samples on top of the
stack ("self") and anywhere on it ("total"). Sampling from outside costs the gateway next to
nothing, unlike cProfile, whose per-call hooks would swamp a data path of small calls.
"""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY_SPY = REPO / ".venv-tools" / "py-spy" / "bin" / "py-spy"
REQUIREMENT = "py-spy>=0.4,<0.5"


def ensure_py_spy() -> Path:
    """py-spy in its own venv (the same place scripts/lib.sh's ensure_tool would put it)."""
    if not PY_SPY.exists():
        root = PY_SPY.parent.parent
        print(f"installing {REQUIREMENT} into {root}", file=sys.stderr)
        venv.create(root, with_pip=True)
        subprocess.run([root / "bin" / "python", "-m", "pip", "install", "-q", REQUIREMENT],
                       check=True)
    return PY_SPY


class Recording:
    """``py-spy record`` of one process until ``stop()``; collapsed stacks to ``output``."""

    def __init__(self, pid: int, output: Path, rate: int = 250) -> None:
        self.output = output
        self._process = subprocess.Popen(
            [str(ensure_py_spy()), "record", "--pid", str(pid), "--rate", str(rate),
             "--format", "raw", "--nonblocking", "--output", str(output)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> None:
        # py-spy writes its output when interrupted, as on Ctrl-C.
        self._process.send_signal(signal.SIGINT)
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)


def frame_name(frame: str) -> str:
    """``func (path/to/module.py:123)`` → ``func (module.py)``: lines split one function."""
    name, _, where = frame.partition(" (")
    module = where.rsplit("/", 1)[-1].split(":", 1)[0].rstrip(")")
    return f"{name} ({module})" if module else name


def summarise(paths: list[Path], top: int = 25) -> str:
    """The functions with the most samples, self and total, over all recordings."""
    self_counts: collections.Counter[str] = collections.Counter()
    total_counts: collections.Counter[str] = collections.Counter()
    samples = 0
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [frame_name(f) for f in stack.split(";")]
            samples += count
            self_counts[frames[-1]] += count
            for name in set(frames):
                total_counts[name] += count
    if not samples:
        return "py-spy: no samples"
    lines = [f"py-spy, {samples} samples",
             "  self%  total%  function"]
    for name, count in self_counts.most_common(top):
        lines.append(f"  {100 * count / samples:5.1f}  {100 * total_counts[name] / samples:6.1f}"
                     f"  {name}")
    lines.append("  -- by total --")
    for name, count in total_counts.most_common(top):
        lines.append(f"  {100 * self_counts[name] / samples:5.1f}  {100 * count / samples:6.1f}"
                     f"  {name}")
    return "\n".join(lines)
