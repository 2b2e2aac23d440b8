"""docs/openapi.yaml against a real ``modelconsole --serve``, by Schemathesis.

The examples, coverage and fuzzing phases generate thousands of requests from
the document (valid and deliberately invalid ones) and check every answer:
no server error, statuses and content types the document declares, bodies and
headers (and each server-sent event) matching their schemas, invalid input
refused, undeclared methods answered 405, and data the document calls valid
accepted (``positive_data_acceptance``), except on the few operations whose
remaining rules a JSON Schema cannot say (tests/schemathesis.toml names them
and why).  One host is tested against the document less its fleet-only
parameters (``x-fleet-only``).  The same run goes against one process and
against two front-end processes: both must keep every promise.

Bounded for CI: a fixed number of examples per operation and a time budget.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_server import _env, serving

pytest.importorskip("schemathesis")

SPEC = Path(__file__).resolve().parents[1] / "docs" / "openapi.yaml"
SETTINGS = Path(__file__).resolve().parent / "schemathesis.toml"
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


def one_host_spec(folder: Path) -> Path:
    """docs/openapi.yaml as one host serves it: the fleet-only parameters left out."""
    spec = yaml.safe_load(SPEC.read_text())
    fleet_only = {f"#/components/parameters/{k}" for k, p in spec["components"]["parameters"].items()
                  if p.get("x-fleet-only")}
    for item in spec["paths"].values():
        for op in [item, *(v for v in item.values() if isinstance(v, dict))]:
            if isinstance(op.get("parameters"), list):
                op["parameters"] = [p for p in op["parameters"] if p.get("$ref") not in fleet_only]
    out = folder / "openapi-one-host.yaml"
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


@pytest.mark.parametrize("workers", [0, 2], ids=["one-process", "2-front-ends"])
def test_the_server_keeps_every_promise_of_its_openapi_document(tmp_path, workers):
    token = "schemathesis-token"
    config = CONFIG + f'\n[server]\nworkers = {workers}\ngrpc_port = "off"\n'
    with serving(tmp_path, config, _env(MODELCONSOLE_TOKEN=token)) as s:
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "--config-file", str(SETTINGS), "run",
             str(one_host_spec(tmp_path)), "--url", s.url, "-H", f"Authorization: Bearer {token}",
             "--phases", "examples,coverage,fuzzing", "--max-examples", "15", "--max-time", "120",
             "--workers", "1", "--request-timeout", "30", "--seed", "1"],  # checks: all, as SETTINGS says
            capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert s.proc.poll() is None, "the server died under the fuzzer:\n" + s.stderr()[-3000:]
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "Tested:" in run.stdout
