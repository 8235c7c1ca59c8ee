"""utils.experiments: the grid's commands, options passed through to them, --run and the Slurm array script."""
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from utils import experiments, results
from utils.checkpoint import CHECKPOINT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def printed_commands(*argv):
    done = subprocess.run([sys.executable, "-m", "utils.experiments", *argv], cwd=REPO, check=True,
                          capture_output=True, text=True)
    assert done.stderr == ""
    return [shlex.split(line) for line in done.stdout.splitlines()]


def option(command, flag):
    return command[command.index(flag) + 1]


def test_experiment_grid_has_the_papers_commands():
    commands = printed_commands()
    assert len(commands) == 4 * 5 + (1 + 5 * 4)
    assert len({option(c, "--out") for c in commands}) == len(commands)
    assert {c[1] for c in commands} == {"train-SL.py", "train-PL.py", "train-MT.py", "train-MM.py",
                                        "train-L2I-O.py", "train-L2I-L.py"}
    assert all(c[0] == "python" and option(c, "--gpu") == "0" and option(c, "--manualSeed") == "0" for c in commands)
    assert sum(option(c, "--n-labeled") == "-1" for c in commands) == 1
    assert ["python", "train-L2I-O.py", "--gpu", "0", "--n-labeled", "250", "--manualSeed", "0",
            "--out", "runs/cifar10L2IO@250-s0"] in commands
    assert {option(c, "--n-labeled") for c in commands if c[1] == "train-PL.py"} == {"0.01", "0.05", "0.1", "0.2"}


def test_experiment_grid_per_seed_gpu_and_filter():
    two_seeds = printed_commands("--print", "--seeds", "0", "1", "--gpu", "3")
    assert len(two_seeds) == 2 * 41 and len({option(c, "--out") for c in two_seeds}) == 2 * 41
    assert sum(option(c, "--n-labeled") == "-1" for c in two_seeds) == 2
    assert all(option(c, "--gpu") == "3" for c in two_seeds)
    l2io = printed_commands("--filter", "L2I-O")
    assert len(l2io) == 5 + 4 and all(c[1] == "train-L2I-O.py" for c in l2io)


def test_unknown_options_pass_through_to_every_command_and_escape_the_filter():
    extra = ["--data-root", "/data/aflw_release-2", "--workers", "4"]
    commands = printed_commands("--filter", "aflw", *extra, "--gpu", "2")
    # The filter looks at the grid's part only: the data root also contains "aflw".
    assert len(commands) == 1 + 5 * 4 and all("aflw" in option(c, "--out") for c in commands)
    assert all(c[-len(extra):] == extra and option(c, "--gpu") == "2" for c in commands)


def test_run_skips_finished_resumes_checkpointed_and_starts_the_rest(tmp_path):
    grid = experiments.select(experiments.grid([0], root=str(tmp_path)), "0", "cifar10MT@")
    finished, checkpointed, fresh = grid[0], grid[1], grid[2:]
    for e, name in ((finished, "summary.json"), (checkpointed, experiments.CHECKPOINT)):
        os.makedirs(e.out)
        open(os.path.join(e.out, name), "w").close()
    calls = []
    extra = ["--epochs", "2", "--amp"]
    status = experiments.main(["--run", "--gpu", "1", "--root", str(tmp_path), "--filter", "cifar10MT@", *extra],
                              runner=lambda command: calls.append(command) or 0)
    assert status == 0 and len(calls) == 1 + len(fresh)
    assert calls[0][1:] == [os.path.join(experiments.REPO, "train-MT.py"), "--resume", checkpointed.out,
                            "--gpu", "1", *extra]
    assert [option(c, "--out") for c in calls[1:]] == [e.out for e in fresh]
    assert all(finished.out not in c and option(c, "--gpu") == "1" and c[-len(extra):] == extra for c in calls)


def test_array_task_runs_only_the_ith_command(tmp_path):
    calls = []
    argv = ["--run", "--root", str(tmp_path), "--filter", "aflw"]
    assert experiments.main(argv + ["--array-task", "3"], runner=lambda c: calls.append(c) or 0) == 0
    printed = experiments.select(experiments.grid([0], root=str(tmp_path)), "0", "aflw")
    assert len(calls) == 1 and option(calls[0], "--out") == printed[2].out


@pytest.mark.parametrize("argv, message", [
    (["--out", "x"], "--out is set by the grid for each run and cannot be passed through"),
    (["--manualSeed=3"], "--manualSeed is set by the grid for each run and cannot be passed through"),
    (["--array-task", "1"], "--array-task needs --run"),
    (["--run", "--filter", "aflw", "--array-task", "22"], "--array-task 22: there are 21 commands (1-21)"),
    (["--filter", "no-such-run"], "no command of the grid contains --filter 'no-such-run'"),
    (["--filter", "aflw", "stray"], "unexpected argument 'stray'"),
    (["--run", "--filter", "cifar10MT@250-", "--array-task", "2"], "--array-task 2: there is 1 command (1-1)"),
])
def test_user_mistakes_are_one_line_and_exit_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        experiments.main(argv, runner=lambda c: pytest.fail(f"ran {c}"))
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == "" and err == f"error: {message}\n"


def test_run_stops_when_a_run_is_interrupted_and_counts_failures(tmp_path):
    grid = experiments.select(experiments.grid([0], root=str(tmp_path)), "0", "cifar10MM@")
    calls = []
    assert experiments.run_all(grid, "0", runner=lambda c: calls.append(c) or 130) == 1 and len(calls) == 1
    assert experiments.run_all(grid, "0", runner=lambda c: 1) == len(grid)


def test_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path, capsys):
    early, foreign, empty = experiments.select(experiments.grid([0], root=str(tmp_path)), "0", "cifar10MT@")[:3]
    written = ["args.json", "split.json", "log.txt", "status.json", "status.json.tmp", "checkpoint.pth.tar.tmp",
               "events.out.tfevents.1700000000.host.1.123"]
    for e, names in ((early, written), (foreign, ["args.json", "log.txt", "notes.txt"]), (empty, [])):
        os.makedirs(e.out)
        for name in names:
            open(os.path.join(e.out, name), "w").close()
    calls = []
    failed = experiments.run_all([early, foreign, empty], "0", runner=lambda command: calls.append(command) or 0)
    out, err = capsys.readouterr()
    assert failed == 1 and [option(c, "--out") for c in calls] == [early.out, empty.out]  # started, not resumed
    assert os.listdir(early.out) == [] and sorted(os.listdir(foreign.out)) == ["args.json", "log.txt", "notes.txt"]
    assert f"{early.out} was stopped before its first checkpoint: removed {', '.join(sorted(written))} to start it " \
           f"again" in out.splitlines()
    assert err.splitlines() == [f"cannot start {foreign.out} again: it has no checkpoint.pth.tar to resume, and it "
                                f"holds notes.txt, which a training script does not write before its first "
                                f"checkpoint; move the folder away"]


def test_a_single_failed_run_is_one_run(tmp_path, capsys):
    status = experiments.main(["--run", "--root", str(tmp_path), "--filter", "cifar10MT@250-"], runner=lambda c: 1)
    assert status == 1 and capsys.readouterr().err.splitlines()[-1] == "1 of 1 run did not finish"


def test_a_one_task_slurm_array_is_one_task(tmp_path):
    script, stdout = write_slurm_script(tmp_path, ["--root", str(tmp_path / "runs"), "--filter", "cifar10MT@250-"])
    assert stdout.startswith(f"wrote {script}: a Slurm array of 1 task, logs in ")
    assert "task i trains the i-th of the 1 command that" in script.read_text()


def test_the_runner_returns_the_scripts_exit_status():
    assert experiments.run_child([sys.executable, "-c", "import sys; sys.exit(3)"]) == 3


def test_run_folder_file_names_match_the_training_code():
    assert (experiments.CHECKPOINT, experiments.SUMMARY) == (CHECKPOINT, results.SUMMARY)


# ----------------------------------------------------------------------------- the Slurm array script

def write_slurm_script(tmp_path, grid_options):
    script = tmp_path / "grid.sbatch"
    done = subprocess.run([sys.executable, "-m", "utils.experiments", *grid_options, "--slurm", str(script)],
                          cwd=REPO, check=True, capture_output=True, text=True)
    return script, done.stdout


def grid_options(tmp_path):
    """Two seeds of the AFLW grid whose commands fail at once: their data folder does not exist."""
    return ["--seeds", "0", "1", "--filter", "aflw", "--root", str(tmp_path / "runs"),
            "--data-root", str(tmp_path / "missing"), "--workers", "0"]


def test_slurm_script_is_one_array_task_per_command(tmp_path):
    options = grid_options(tmp_path)
    script, stdout = write_slurm_script(tmp_path, options)
    text = script.read_text()
    assert re.findall(r"^#SBATCH --array=(.*)$", text, re.M) == [f"1-{len(printed_commands(*options))}"]
    assert "#SBATCH --requeue" in text.splitlines() and "#SBATCH --gres=gpu:1" in text.splitlines()
    logs = tmp_path / "runs" / experiments.SLURM_LOGS
    assert re.findall(r"^#SBATCH --output=(.*)$", text, re.M) == [f"{logs}/%A_%a.out"] and logs.is_dir()
    # Nothing of the machine that wrote it: the task runs in the folder it is submitted from, with the
    # environment's python.
    assert REPO not in text and sys.executable not in text
    lines = text.strip().splitlines()
    cd, run = lines[lines.index("set -euo pipefail") + 1], lines[-1]
    assert shlex.split(cd)[:2] == ["cd", "${SLURM_SUBMIT_DIR:-.}"]
    assert shlex.split(run) == ["python", "-m", "utils.experiments", "--run", "--array-task",
                                "$SLURM_ARRAY_TASK_ID", "--seeds", "0", "1", "--gpu", "0", "--root",
                                str(tmp_path / "runs"), "--filter", "aflw", *options[-4:]]
    assert '--array-task "$SLURM_ARRAY_TASK_ID"' in run  # quoted for bash, expanded by it
    assert f"sbatch {script}" in stdout


def test_run_folders_inside_the_repository_are_named_relative_to_it(tmp_path):
    assert experiments.repository_relative(os.path.join(REPO, "runs")) == "runs"
    assert experiments.repository_relative(str(tmp_path / "runs")) == str(tmp_path / "runs")


@pytest.mark.parametrize("grid, workers, cpus", [
    (["--filter", "aflw"], ["--workers", "4"], 4 * 3 + 1),        # L2I draws labeled, unlabeled and meta batches
    (["--filter", "cifar10MT@"], ["--workers=4"], 4 * 2 + 1),    # MT: labeled and unlabeled
    (["--filter", "SL@"], ["--workers", "2"], 2 * 1 + 1),         # SL: labeled only
    (["--filter", "aflw"], ["--workers", "0"], 1),                # loading in the training process
    (["--filter", "aflw"], [], experiments.DEFAULT_CPUS),
])
def test_slurm_cpus_follow_the_passed_workers(tmp_path, grid, workers, cpus):
    script, _ = write_slurm_script(tmp_path, ["--root", str(tmp_path / "runs"), *grid, *workers])
    text = script.read_text()
    assert re.findall(r"^#SBATCH --cpus-per-task=(.*)$", text, re.M) == [str(cpus)]
    if workers:
        assert f"+ 1 = {cpus} CPUs." in text


def test_loaders_per_method_are_the_scripts_streams():
    for method, loaders in experiments.TRAINING_LOADERS.items():
        with open(os.path.join(REPO, f"train-{method}.py")) as f:
            streams = re.search(r"streams=\(([^)]*)\)", f.read()).group(1)
        assert len(re.findall(r'"\w+"', streams)) == loaders, method


def test_slurm_script_in_a_missing_folder_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        experiments.main(["--root", str(tmp_path / "runs"), "--slurm", str(tmp_path / "missing" / "grid.sbatch")])
    assert exit_info.value.code == 2
    script = tmp_path / "missing" / "grid.sbatch"
    assert capsys.readouterr().err == f"error: cannot write {script} (No such file or directory)\n"
    assert os.listdir(tmp_path) == []


def environment_python(tmp_path):
    """A folder whose ``python`` is this interpreter, as an activated environment puts one first on PATH."""
    folder = tmp_path / "env-bin"
    folder.mkdir()
    (folder / "python").symlink_to(sys.executable)
    return folder


def run_task(script, task, submit_dir, path, cwd):
    env = dict(os.environ, SLURM_ARRAY_TASK_ID=str(task), SLURM_SUBMIT_DIR=str(submit_dir), PATH=path)
    return subprocess.run([shutil.which("bash"), str(script)], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("end", ["first", "last"])  # the index is 1-based: both ends of the array
def test_slurm_array_task_i_starts_the_ith_printed_command(tmp_path, end):
    options = grid_options(tmp_path)
    script, _ = write_slurm_script(tmp_path, options)
    printed = printed_commands(*options)
    i = 1 if end == "first" else len(printed)
    python = environment_python(tmp_path)
    done = run_task(script, i, REPO, f"{python}{os.pathsep}{os.environ['PATH']}", cwd=tmp_path)
    started = [shlex.split(line.split(": ", 1)[1]) for line in done.stdout.splitlines()
               if line.startswith("starting: ")]
    assert len(started) == 1, done.stdout + done.stderr
    command, want = started[0], printed[i - 1]
    # The printed line names `python` and the script; the task runs the environment's python, the script by
    # its full path in the repository it was submitted from.
    assert command[0] == str(python / "python") and command[1] == os.path.join(REPO, want[1])
    assert command[2:] == want[2:]
    assert f"failed (exit status 2): {option(want, '--out')}" in done.stderr and done.returncode == 1


def test_slurm_task_outside_the_repository_or_without_python_stops_with_one_line(tmp_path):
    script, _ = write_slurm_script(tmp_path, grid_options(tmp_path))
    elsewhere = run_task(script, 1, tmp_path, os.environ["PATH"], cwd=tmp_path)
    assert elsewhere.returncode == 2 and elsewhere.stdout == ""
    assert elsewhere.stderr == (f"error: {tmp_path} is not the repository folder (no train-MT.py): submit "
                                f"grid.sbatch from there\n")
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    no_python = run_task(script, 1, REPO, str(empty), cwd=tmp_path)
    assert no_python.returncode == 2 and no_python.stderr == (
        "error: no python on PATH: activate the repository's environment, then submit grid.sbatch again\n")
