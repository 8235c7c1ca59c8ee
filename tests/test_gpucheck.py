"""``python -m utils.gpucheck``: the thin wrapper that runs the test suite on CUDA and the benchmark, checked on
the CPU at tiny sizes (``--device cpu``): the same commands, reports and timeouts as on a GPU."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from utils import gpucheck

pytestmark = pytest.mark.slow   # end-to-end runs / compilation: left out by `-m "not slow"`

REPO = Path(__file__).resolve().parents[1]
SCRIPT_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
# Two quick device tests and MT on AFLW at batch 8 for one timed iteration: every step runs, in ~25 s.
TINY = ["--device", "cpu", "--pytest-args", "tests/test_device.py -k 'exact and aflw'", "--methods", "MT",
        "--tasks", "aflw", "--batch-size", "8", "--iters", "1", "--benchmarks", "fp32"]


def gpucheck_cli(*args):
    return subprocess.run([sys.executable, "-m", "utils.gpucheck", *map(str, args)], cwd=REPO, env=SCRIPT_ENV,
                          capture_output=True, text=True, timeout=300)


def read_report(folder):
    return json.loads((folder / "gpucheck.json").read_text()), (folder / "gpucheck.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_one_line_and_nothing_written(tmp_path):
    out = tmp_path / "check"
    proc = gpucheck_cli("--out", out)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: CUDA is not available"), proc.stderr
    assert not out.exists()


def test_a_tiny_check_writes_both_reports(tmp_path):
    out = tmp_path / "check"
    proc = gpucheck_cli("--out", out, *TINY)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report, text = read_report(out)
    assert proc.stdout.endswith(text) and text.startswith("# GPU check: PASS")
    assert report["passed"] is True and report["torch"] == torch.__version__
    pytest_step, benchmark_step = report["steps"]
    assert pytest_step["name"] == "pytest" and pytest_step["returncode"] == 0
    assert "--device cpu" in pytest_step["command"] and "-rfEs" in pytest_step["command"]
    assert pytest_step["summary"].startswith("2 passed") and f"**{pytest_step['summary']}**" in text
    assert (benchmark_step["name"], benchmark_step["returncode"]) == ("benchmark-fp32", 0)
    assert "--meta-grad exact unroll" in benchmark_step["command"]
    (row,) = benchmark_step["rows"]
    assert (row["method"], row["task"], row["flags"]) == ("MT", "aflw", []) and row["median_s"] > 0
    assert f"| MT | aflw |  | {1e3 * row['median_s']:.1f} |" in text
    assert (out / "pytest.log").is_file() and (out / "benchmark-fp32.log").is_file()


def test_a_step_past_its_time_is_reported_and_the_rest_not_started(tmp_path):
    """--total 1: pytest is stopped after 1 s (importing torch alone takes longer) and the benchmark, with no
    time left, never starts; both reports say so, the check fails, and it ends within seconds."""
    out = tmp_path / "check"
    started = time.monotonic()
    proc = gpucheck_cli("--out", out, "--total", 1, *TINY)
    assert time.monotonic() - started < 60
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    report, text = read_report(out)
    assert report["passed"] is False
    assert [(s["name"], s["status"], s["returncode"]) for s in report["steps"]] == [
        ("pytest", "timed out after 1 s", None), ("benchmark-fp32", "not run: no time left", None)]
    assert text.startswith("# GPU check: FAIL")
    assert "| pytest | timed out after 1 s |" in text and "**no pytest summary: timed out after 1 s**" in text


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_timed_out_step_is_killed_with_the_processes_it_started(tmp_path):
    pid_file = tmp_path / "child.pid"
    command = [sys.executable, "-c", "import subprocess, sys, time; "
               "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
               f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(60)"]
    started = time.monotonic()
    step = gpucheck.run_step("sleeper", command, tmp_path / "sleeper.log", 2)
    assert time.monotonic() - started < 10
    assert (step["status"], step["returncode"]) == ("timed out after 2 s", None)
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(child), "the step's own child process outlived the timeout"


def running(pid):
    """Whether process ``pid`` exists and is not a zombie (killed, not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_failing_step_is_reported_with_its_exit_status(tmp_path):
    step = gpucheck.run_step("fails", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
                             tmp_path / "fails.log", 30)
    assert (step["status"], step["returncode"]) == ("failed (exit 3)", 3)
    assert (tmp_path / "fails.log").read_text() == "boom\n"


def test_the_pytest_summary_line_and_short_lines_are_found(tmp_path):
    log = tmp_path / "pytest.log"
    log.write_text("..F.s\n=== short test summary info ===\nFAILED tests/test_device.py::test_x[a] - AssertionError\n"
                   "SKIPPED [2] tests/test_device.py:72: on the CPU\n1 failed, 3 passed, 2 skipped, 9 deselected in 4.2s\n")
    outcome = gpucheck.pytest_outcome(log)
    assert outcome["summary"] == "1 failed, 3 passed, 2 skipped, 9 deselected in 4.2s"
    assert outcome["short"] == ["FAILED tests/test_device.py::test_x[a] - AssertionError",
                                "SKIPPED [2] tests/test_device.py:72: on the CPU"]
    assert gpucheck.pytest_outcome(tmp_path / "missing.log") == {"summary": None, "short": []}


def test_a_used_report_folder_is_refused(tmp_path, capsys):
    (tmp_path / "old.txt").write_text("earlier report")
    with pytest.raises(SystemExit) as exit_info:
        gpucheck.main(["--out", str(tmp_path), "--device", "cpu"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: --out")
    assert [p.name for p in tmp_path.iterdir()] == ["old.txt"]
