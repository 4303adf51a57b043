"""benchmarks/edge.py in its quick mode: it runs the real programs end to end and prints every
figure. Times are not checked (a benchmark's figures are for people); what is: every figure is
there, TLS sessions really resume, and the load reached the edge without 429s or errors."""

import re
import subprocess
import sys

import pytest

from conftest import TEMPLATE

pytestmark = pytest.mark.e2e

sys.path.insert(0, str(TEMPLATE / "benchmarks"))
from edge import LABELS  # noqa: E402


def test_edge_benchmark_prints_every_figure() -> None:
    result = subprocess.run(
        [sys.executable, str(TEMPLATE / "benchmarks" / "edge.py"), "--quick"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for label in LABELS:
        line = next((line for line in lines if line.strip().startswith(label)), None)
        assert line and re.search(r"\d", line.removeprefix(label)) and "nan" not in line, f"{label}: {line}\n{result.stdout}"
    for line in lines:
        if line.strip().startswith("tls handshakes"):
            assert "sessions resumed: 0%" not in line, line
    assert "0 answers 429, 0 other errors" in result.stdout, result.stdout
