"""benchmarks/on_gpu.sh rehearsed without a GPU: a python3 that records each stage's command line instead of running it,
then every recorded command line goes through its own program's parser. Device time is scarce; a typo must show here."""
import importlib
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

from benchmarks import kernel_speed

ROOT = Path(__file__).resolve().parents[1]
FASTEST = "fused+grouped+gemm"
RECORDER = '''#!{python}
"""python3 of a rehearsal: records its command line; --fastest answers like kernel_speed, from REHEARSAL_FASTEST."""
import json, os, sys
with open(os.environ["REHEARSAL_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
if "--fastest" in sys.argv:
    print(os.environ["REHEARSAL_FASTEST"] or "error: no table", file=sys.stdout if os.environ["REHEARSAL_FASTEST"] else sys.stderr)
    sys.exit(0 if os.environ["REHEARSAL_FASTEST"] else 2)
'''


def rehearse(tmp_path: Path, *stages: str, fastest: str = FASTEST, seconds: str = "540") -> tuple[subprocess.CompletedProcess,
                                                                                                   list[list[str]]]:
    """Run on_gpu.sh with the recording python3 first on PATH; its exit and the command lines it ran."""
    bin_dir, log = tmp_path / "bin", tmp_path / "commands.jsonl"
    bin_dir.mkdir(exist_ok=True)
    recorder = bin_dir / "python3"
    recorder.write_text(RECORDER.format(python=sys.executable))
    recorder.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path), "REHEARSAL_LOG": str(log),
           "REHEARSAL_FASTEST": fastest, "ON_GPU_SECONDS": seconds}
    done = subprocess.run(["bash", "benchmarks/on_gpu.sh", str(tmp_path / "out"), *stages], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    return done, [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def stage_names(tmp_path: Path) -> list[str]:
    """Every stage on_gpu.sh has, from its one-line refusal of a stage it lacks (which runs nothing)."""
    done, commands = rehearse(tmp_path, "nope")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and not commands
    assert done.stderr.startswith("error: no stage 'nope'; choose from: all ")
    return done.stderr.split("choose from: all ")[1].split()


def test_every_stage_is_a_command_line_its_program_accepts(tmp_path):
    names = stage_names(tmp_path)
    done, commands = rehearse(tmp_path, "all")
    assert done.returncode == 0, done.stderr
    ran = [line.split()[0] for line in (tmp_path / "out/stages.txt").read_text().splitlines() if " rc=0 " in line]
    assert ran == names  # each stage once, in the order listed, none refused
    programs = [c for c in commands if c[0] == "-m"]
    for _, module, *args in programs:
        if module == "pytest":
            assert [a for a in args if a.endswith(".py")] and all((ROOT / a).is_file() for a in args if a.endswith(".py"))
            continue
        parsed = importlib.import_module(module).parse(args)  # a bad option or value: SystemExit(2), the test fails
        if "--fastest" not in args:  # which reads a table; the others write results outside the repo
            assert getattr(parsed, "out", str(tmp_path)).startswith(str(tmp_path))
    assert len(programs) == len(names) + 1  # each stage one program, and kernel_speed --fastest between two
    assert tarfile.open(tmp_path / "out/results.tgz").getnames()


def test_the_fastest_stage_trains_the_kinds_kernels_bf16_measured(tmp_path):
    done, commands = rehearse(tmp_path, "kernels_bf16", "stacked_fastest_5ep")
    assert done.returncode == 0, done.stderr
    (_, _, *measured), (_, _, flag, table), (_, _, *trained) = commands[-3:]
    assert flag == "--fastest" and table == f"{kernel_speed.table_stem(kernel_speed.parse(measured))}.csv"
    assert trained[trained.index("--stacked-conv") + 1] == FASTEST and trained[trained.index("--epochs") + 1] == "5"
    assert f"fastest per conv block: {FASTEST}" in (tmp_path / "out/stages.txt").read_text()


def test_without_a_table_the_fastest_stage_says_so_and_trains_nothing(tmp_path):
    done, commands = rehearse(tmp_path, "stacked_fastest_5ep", fastest="")
    assert done.returncode == 0 and [c[1] for c in commands if c[0] == "-m"] == ["benchmarks.kernel_speed"]
    assert "fastest per conv block: none (no kernels_bf16 table)" in (tmp_path / "out/stages.txt").read_text()


def test_stages_past_the_budget_are_skipped_and_say_so(tmp_path):
    """A device call is cut at 600 s with what it had not yet packed: the script ends within its budget instead."""
    done, commands = rehearse(tmp_path, "kernels_bf16", "tests", seconds="10")
    assert done.returncode == 0 and not [c for c in commands if c[0] == "-m"]
    lines = (tmp_path / "out/stages.txt").read_text().splitlines()
    assert [re.sub(r": \d+s of", ": Ns of", line) for line in lines] == [
        f"{name} skipped: Ns of the 10s budget left" for name in ("kernels_bf16", "tests")]
