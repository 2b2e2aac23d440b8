"""`modelconsole --check-config`, run as a real subprocess, on a good and a broken file."""

from __future__ import annotations

import subprocess
import sys

import torch


def run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "modelconsole.console", *args],
        capture_output=True, text=True, timeout=300, cwd=cwd,
    )


def test_check_config_good_file(tmp_path):
    torch.jit.save(torch.jit.script(torch.nn.Linear(16, 4)), str(tmp_path / "lin.pt"))
    (tmp_path / "ok.toml").write_text(
        """
[[models]]
name = "tiny"
source = "zoo:tiny-mlp"

[[models]]
name = "lin"
source = "torchscript:lin.pt"
inputs = [{ name = "x", datatype = "FP32", shape = [-1, 16] }]
outputs = [{ name = "y", datatype = "FP32", shape = [-1, 4] }]
"""
    )
    proc = run("--check-config", str(tmp_path / "ok.toml"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:7] == ["MODEL", "VERSION", "SOURCE", "DEVICE", "LOAD", "FOOTPRINT", "STATUS"]
    tiny = next(line for line in lines if line.startswith("tiny "))
    assert "zoo:tiny-mlp" in tiny and "cpu" in tiny and "KiB" in tiny and tiny.rstrip().endswith("ok")
    lin = next(line for line in lines if line.startswith("lin "))
    assert lin.rstrip().endswith("ok")
    assert "all 2 models loaded and answered" in proc.stdout


def test_check_config_model_that_fails_to_load(tmp_path):
    (tmp_path / "bad.toml").write_text(
        """
[[models]]
name = "tiny"
source = "zoo:tiny-mlp"

[[models]]
name = "enc"
source = "zoo:encoder"
args = { d_model = 30, heads = 4, layers = 1, seq = 8 }
"""
    )
    proc = run("--check-config", str(tmp_path / "bad.toml"))
    assert proc.returncode == 1
    enc = next(line for line in proc.stdout.splitlines() if line.startswith("enc "))
    assert "expected a divisor of d_model" in enc
    tiny = next(line for line in proc.stdout.splitlines() if line.startswith("tiny "))
    assert tiny.rstrip().endswith("ok")  # one broken model does not hide the others
    assert "1 of 2 models failed" in proc.stderr


def test_check_config_broken_file(tmp_path):
    (tmp_path / "broken.toml").write_text('[[models]]\nname = "a"\nsource = "zoo:tiny-mlp"\nmax_batch_size = "abc"\n')
    proc = run("--check-config", str(tmp_path / "broken.toml"))
    assert proc.returncode == 1
    assert 'broken.toml: models[0].max_batch_size: expected a non-negative integer' in proc.stderr
    assert 'got "abc"' in proc.stderr
    assert proc.stdout == ""


def test_check_config_missing_file_and_bad_toml(tmp_path):
    proc = run("--check-config", str(tmp_path / "absent.toml"))
    assert proc.returncode == 1 and "absent.toml: no such file" in proc.stderr
    (tmp_path / "x.toml").write_text("name = = 1")
    proc = run("--check-config", str(tmp_path / "x.toml"))
    assert proc.returncode == 1 and "x.toml: invalid TOML" in proc.stderr


def test_source_escaping_model_roots_is_refused(tmp_path):
    sub = tmp_path / "conf"
    sub.mkdir()
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "outside.pt"))
    (sub / "esc.toml").write_text(
        """
[[models]]
name = "esc"
source = "torchscript:../outside.pt"
inputs = [{ name = "x", datatype = "FP32", shape = [-1, 2] }]
outputs = [{ name = "y", datatype = "FP32", shape = [-1, 2] }]
"""
    )
    proc = run("--check-config", str(sub / "esc.toml"))
    assert proc.returncode == 1
    assert "outside the model roots" in proc.stdout


def test_serve_flags_for_workers_and_grpc_refuse_bad_values(tmp_path):
    import subprocess
    import sys

    for flags, message in ((["--workers", "-1"], "--workers: expected 0 (one process) or more, got -1"),
                           (["--grpc-port", "on"], "--grpc-port: expected a port 0-65535 or off, got 'on'"),
                           (["--grpc-port", "70000"], "--grpc-port: expected a port 0-65535 or off")):
        p = subprocess.run([sys.executable, "-m", "modelconsole.console", "--serve", "--port", "0",
                            "--store", str(tmp_path / "s.db"), *flags], capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and message in p.stderr, (flags, p.stderr)


def test_console_flags_refuse_bad_values_with_a_clear_message(tmp_path):
    import subprocess
    import sys

    from serverutil import ServerThread

    p = subprocess.run([sys.executable, "-m", "modelconsole.console", "--attach", "http://127.0.0.1:9",
                        "--keymap", "load"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--keymap: expected ID=KEYS pairs" in p.stderr
    p = subprocess.run([sys.executable, "-m", "modelconsole.console", "--attach", "http://127.0.0.1:9"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "cannot attach to http://127.0.0.1:9" in p.stderr
    for bad, message in (("0.1", "expected 0.25 to 60 seconds, got 0.1"), ("soon", "expected seconds")):
        p = subprocess.run([sys.executable, "-m", "modelconsole.console", "--attach", "http://127.0.0.1:9",
                            "--interval", bad], capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and f"--interval: {message}" in p.stderr, p.stderr
    with ServerThread(tmp_path, models=[{"name": "tiny", "source": "zoo:tiny-mlp"}]) as srv:
        p = subprocess.run([sys.executable, "-m", "modelconsole.console", "--attach", srv.url, "--theme", "nope"],
                           capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "unknown theme 'nope'" in p.stderr and "modelconsole-light" in p.stderr


def test_cluster_flag_needs_serve_and_a_ray_address(capsys):
    from modelconsole.console.cli import main

    assert main(["--cluster", "ray"]) == 2
    assert "use it with --serve" in capsys.readouterr().err
    assert main(["--serve", "--cluster", "http://10.0.0.1:6379", "--port", "0"]) == 2
    assert '--cluster: expected "ray", "ray://HOST:PORT"' in (err := capsys.readouterr().err) and '"local:N"' in err
