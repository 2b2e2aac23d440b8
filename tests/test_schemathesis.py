"""docs/openapi.yaml against a real ``modelconsole --serve``, by Schemathesis.

The examples, coverage and fuzzing phases generate thousands of requests from
the document (valid and deliberately invalid ones) and check every answer:
no server error, statuses and content types the document declares, bodies and
headers (and each server-sent event) matching their schemas, invalid input
refused, undeclared methods answered 405.  ``positive_data_acceptance`` is
left out: a schema cannot say that a priority must not exceed the model's
``priority_levels`` or that canary steps increase, so the server rightly
refuses some schema-valid bodies (with a 400 naming the field).

Bounded for CI: a fixed number of examples per operation and a time budget.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_server import _env, serving

pytest.importorskip("schemathesis")

SPEC = Path(__file__).resolve().parents[1] / "docs" / "openapi.yaml"
CONFIG = """
[[models]]
name = "tiny"
source = "zoo:tiny-mlp"
warmup = 0

[[models]]
name = "echo"
source = "zoo:identity"
inputs = [{ name = "x", datatype = "FP32", shape = [-1, 3] }]
outputs = [{ name = "y", datatype = "FP32", shape = [-1, 3] }]
warmup = 0

[gpu]
simulate = "1x8GiB"
"""


def test_the_server_keeps_every_promise_of_its_openapi_document(tmp_path):
    token = "schemathesis-token"
    with serving(tmp_path, CONFIG, _env(MODELCONSOLE_TOKEN=token)) as s:
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", str(SPEC), "--url", s.url,
             "-H", f"Authorization: Bearer {token}",
             "--phases", "examples,coverage,fuzzing", "--max-examples", "15", "--max-time", "150",
             "--checks", "all", "--exclude-checks", "positive_data_acceptance",
             "--workers", "1", "--request-timeout", "30", "--seed", "1"],
            capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert s.proc.poll() is None, "the server died under the fuzzer:\n" + s.stderr()[-3000:]
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "Tested:" in run.stdout
