"""``python -m utils.gpucheck``: the CUDA machine check, run here with ``--device cpu`` at tiny sizes.

The same code paths run as on a GPU: scripts as subprocesses on generated data, the exact-vs-unroll
checks in-process, the resume comparison and ``utils.benchmark``; only the sizes and the device differ.
"""
import json
import os
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset.cifar10 import split_indices
from utils import gpucheck

REPO = Path(__file__).resolve().parents[1]
# One thread per process, as tests/test_scripts.py runs the scripts: more oversubscribe 2 cores.
SCRIPT_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
# AFLW only (TCDCNN is ~10× cheaper than WRN-28-2 on a CPU), MT only, no speed-flag runs: every section
# still runs, in about half a minute. Workers 0: forking loader processes costs more than these batches.
TINY = ["--device", "cpu", "--batch-size", "8", "--iterations", "2", "--tasks", "aflw", "--methods", "MT",
        "--flags", "--jobs", "3", "--script-args=--workers 0"]


def gpucheck_cli(*args):
    return subprocess.run([sys.executable, "-m", "utils.gpucheck", *map(str, args)], cwd=REPO, env=SCRIPT_ENV,
                          capture_output=True, text=True, timeout=600)


def read_report(folder):
    return json.loads((folder / "gpucheck.json").read_text()), (folder / "gpucheck.md").read_text()


def options(**overrides):
    return Namespace(**dict(vars(gpucheck.parse_args(["--out", "unused"])), **overrides))


# ----------------------------------------------------------------------------- end to end

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_one_line_and_nothing_written(tmp_path):
    out = tmp_path / "check"
    proc = gpucheck_cli("--out", out)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "CUDA is not available" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.fixture(scope="module")
def passing_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpucheck") / "check"
    proc = gpucheck_cli("--out", out, *TINY)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out, proc


def test_reports_are_written_and_the_markdown_is_printed_last(passing_check):
    out, proc = passing_check
    report, text = read_report(out)
    assert proc.stdout.endswith(text)
    assert text.startswith("# GPU check: PASS")
    assert text.rstrip().splitlines()[-1].startswith("**Overall: PASS**")
    for title in gpucheck.SECTION_TITLES.values():
        assert f"## {title}" in text
    assert report["overall"] == "PASS"
    assert list(report["sections"]) == ["environment", "runs", "exactness", "resume", "benchmark"]
    assert report["sections"]["environment"]["info"]["torch"] == torch.__version__


def test_every_check_passed(passing_check):
    report, _ = read_report(passing_check[0])
    for name, sec in report["sections"].items():
        if name != "environment":
            assert sec["status"] == "pass" and sec["items"], name
            assert {item["status"] for item in sec["items"]} == {"pass"}, name


def test_runs_section_ran_the_script_and_left_a_complete_run_folder(passing_check):
    out, _ = passing_check
    report, _ = read_report(out)
    (item,) = report["sections"]["runs"]["items"]
    assert (item["name"], item["exit_status"]) == ("aflw-MT", 0) and item["wall_s"] > 0
    assert item["command"].startswith("python train-MT.py --gpu cpu ")
    assert "--n-labeled 0.01" in item["command"] and "--epochs 1 --val-iteration 2" in item["command"]
    names = {p.name for p in (out / "runs" / "aflw-MT").iterdir()}
    assert set(gpucheck.RUN_FILES) <= names and any(n.startswith("events.out.tfevents.") for n in names)


def test_exactness_section_compares_both_l2i_variants_within_the_cpu_bounds(passing_check):
    report, _ = read_report(passing_check[0])
    items = report["sections"]["exactness"]["items"]
    assert {(i["check"], i["method"]) for i in items} == {
        (check, method) for check in ("float64 meta-gradient", "float32 train step") for method in ("L2I-O", "L2I-L")}
    for item in items:
        assert item["task"] == "aflw" and 0 <= item["value"] <= item["bound"]
        assert item["bound"] == (1e-10 if item["check"] == "float64 meta-gradient" else 1.0)


def test_resume_section_on_the_cpu_is_bit_exact(passing_check):
    """On the CPU the three runs agree bit for bit (README), so the tolerance is the floor."""
    report, _ = read_report(passing_check[0])
    (item,) = report["sections"]["resume"]["items"]
    assert (item["name"], item["task"]) == ("resume-aflw-MT", "aflw")
    assert set(item["runs"]) == {"straight", "repeat", "first-epoch", "resumed"}
    for what in ("weights", "losses"):
        assert item[what] == {"resumed_vs_straight": 0.0, "repeat_vs_straight": 0.0,
                              "tolerance": gpucheck.RESUME_FLOOR, "pass": True}


def test_benchmark_section_times_the_selected_configuration(passing_check):
    report, text = read_report(passing_check[0])
    (item,) = report["sections"]["benchmark"]["items"]
    assert (item["method"], item["task"], item["flags"]) == ("MT", "aflw", "fp32")
    assert 0 < item["min_ms"] <= item["median_ms"] <= item["max_ms"]
    assert f"Device: {item['device']}." in text


def test_a_failing_script_is_reported_and_fails_the_check(tmp_path):
    out = tmp_path / "check"
    proc = gpucheck_cli("--out", out, "--device", "cpu", "--sections", "runs", "--tasks", "aflw", "--methods", "SL",
                        "--flags", "--script-args=--no-such-option")
    assert proc.returncode == 1
    report, text = read_report(out)
    (item,) = report["sections"]["runs"]["items"]
    assert item["status"] == "fail" and item["exit_status"] == 2
    assert item["reason"].startswith("exit status 2: ") and "--no-such-option" in item["reason"]
    assert (report["overall"], report["overall_reason"]) == ("FAIL", "failed: runs")
    assert "| aflw-SL |  | 2 |" in text and text.rstrip().endswith("checks 0 passed, 1 failed, 0 skipped")


def test_an_exhausted_budget_skips_the_rest_and_does_not_pass(tmp_path):
    out = tmp_path / "check"
    proc = gpucheck_cli("--out", out, "--device", "cpu", "--budget", 0, "--sections", "exactness", "benchmark",
                        "--tasks", "aflw", "--methods", "MT", "--flags")
    assert proc.returncode == 1
    report, text = read_report(out)
    items = [i for key in ("exactness", "benchmark") for i in report["sections"][key]["items"]]
    assert len(items) == 5 and all(i["reason"] == "skipped: time budget" for i in items)
    assert report["overall_reason"] == "not reached within the time budget: exactness"
    assert "SKIPPED | skipped: time budget |" in text


def test_a_used_report_folder_is_refused(tmp_path):
    (tmp_path / "old.txt").write_text("earlier report")
    with pytest.raises(SystemExit) as exit_info:
        gpucheck.main(["--out", str(tmp_path), "--device", "cpu"])
    assert exit_info.value.code == 2
    assert [p.name for p in tmp_path.iterdir()] == ["old.txt"]


# ----------------------------------------------------------------------------- the parts

def test_running_scripts_are_stopped_at_the_deadline(tmp_path, monkeypatch):
    """A script still running at the deadline is killed and reported skipped, and the next never starts."""
    monkeypatch.setattr(gpucheck.Job, "command", lambda job: [sys.executable, "-c", "import time; time.sleep(60)"])
    scripts = gpucheck.Scripts(options(jobs=1), torch.device("cpu"), {"aflw": []}, tmp_path)
    jobs = [scripts.job(name, "MT", "aflw", 1, 2) for name in ("first", "second")]
    started = time.monotonic()
    judged = scripts.run_and_judge(jobs, gpucheck.Budget(1.0))
    assert time.monotonic() - started < 10
    assert judged["first"]["status"] == "skipped" and judged["first"]["exit_status"] is None
    assert judged["first"]["reason"].startswith("skipped: time budget (stopped after ")
    assert (judged["second"]["status"], judged["second"]["reason"]) == ("skipped", "skipped: time budget")


def test_in_process_work_is_interrupted_at_the_deadline():
    def endless():
        while True:
            time.sleep(0.01)
    started = time.monotonic()
    assert gpucheck.guarded(gpucheck.Budget(0.3), endless) == gpucheck.SKIPPED
    assert time.monotonic() - started < 5


def test_an_exception_in_a_check_is_a_failure_with_its_first_line():
    def broken():
        raise RuntimeError("compiled backward unsupported\nlong trace")
    result = gpucheck.guarded(gpucheck.Budget(60), broken)
    assert result == {"status": "fail", "reason": "RuntimeError: compiled backward unsupported"}


def test_verdict_counts_the_checks_not_a_benchmark_configuration_that_fails():
    passed, failed = gpucheck.section([{"status": "pass"}]), gpucheck.section([{"status": "fail"}])
    partly_skipped = gpucheck.section([{"status": "pass"}, {"status": "skipped"}])
    assert gpucheck.verdict({"runs": passed, "resume": partly_skipped, "benchmark": failed}) == ("PASS", "")
    assert gpucheck.verdict({"runs": passed, "exactness": failed}) == ("FAIL", "failed: exactness")
    skipped = gpucheck.section([{"status": "skipped"}])
    assert gpucheck.verdict({"runs": passed, "resume": skipped}) == (
        "FAIL", "not reached within the time budget: resume")


def test_resume_rule_allows_ten_times_the_run_to_run_noise_and_no_more():
    def difference(actual, expected):
        return abs(actual - expected)
    assert gpucheck.compare_three(1.0, 1.0 + 1e-3, 1.0 + 9e-3, difference)["pass"]
    assert not gpucheck.compare_three(1.0, 1.0 + 1e-3, 1.0 + 2e-2, difference)["pass"]
    # Reproducible runs: the floor, not zero, is the tolerance.
    assert gpucheck.compare_three(1.0, 1.0, 1.0 + 5e-6, difference)["pass"]
    assert not gpucheck.compare_three(1.0, 1.0, 1.0 + 5e-5, difference)["pass"]


def test_loss_difference_ignores_a_flip_of_the_logs_last_decimal():
    expected = {"Train Loss": [0.001234, 2.5]}
    assert gpucheck.loss_difference({"Train Loss": [0.001235, 2.5]}, expected) == 0.0
    assert gpucheck.loss_difference({"Train Loss": [0.001234, 2.6]}, expected) == pytest.approx(0.04, rel=1e-3)


def test_generated_cifar10_fits_the_paper_options_and_small_batches():
    """At batch 64: 100 training images per class for ``--n-labeled 250 --n-val 500`` (as the scripts
    split them: every training stream holds at least one batch); smaller batches shrink it."""
    assert gpucheck.cifar_sizes(64) == {"per_class_train": 100, "per_class_test": 20, "n_labeled": 250, "n_val": 500}
    for batch in (64, 8, 2):
        sizes = gpucheck.cifar_sizes(batch)
        labels = np.repeat(np.arange(10), sizes["per_class_train"])
        split = split_indices(labels, sizes["n_labeled"], sizes["n_val"])
        assert len(split["labeled"]) >= batch and len(split["unlabeled"]) >= batch, batch
        assert len(split["validation"]) == sizes["n_val"]


def test_speed_runs_cover_the_flags_on_the_tasks_that_take_them(tmp_path):
    scripts = gpucheck.Scripts(options(), torch.device("cpu"), {"cifar10": [], "aflw": []}, tmp_path)
    jobs = gpucheck.speed_runs(scripts, options())
    assert [job.name for job in jobs] == [
        "cifar10-MT-amp+channels-last", "cifar10-L2I-O-amp+channels-last", "aflw-MT-amp+channels-last",
        "aflw-L2I-O-amp+channels-last", "cifar10-MT-data-on-device", "cifar10-L2I-O-data-on-device",
        "cifar10-MT-compile", "cifar10-L2I-O-compile", "aflw-MT-compile", "aflw-L2I-O-compile"]
    assert jobs[0].argv[-5:-3] == ["--amp", "--channels-last"] and jobs[-1].argv[-4] == "--compile"


def test_benchmark_covers_both_routes_and_every_flag(tmp_path):
    configs = list(gpucheck.benchmark_configs(options(tasks=["aflw"], methods=["MT", "L2I-O"])))
    assert configs[:3] == [("fp32", "aflw", "MT", None), ("fp32", "aflw", "L2I-O", "exact"),
                           ("fp32", "aflw", "L2I-O", "unroll")]
    assert [c[0] for c in configs[::3]] == list(gpucheck.BENCHMARK_FLAGS)
    argv = gpucheck.benchmark_argv(options(), torch.device("cuda", 0), "amp+channels-last", "cifar10", "L2I-O",
                                   "unroll")
    assert argv == ["--methods", "L2I-O", "--tasks", "cifar10", "--device", "cuda:0", "--iters", "10",
                    "--meta-grad", "unroll", "--amp", "--channels-last"]
