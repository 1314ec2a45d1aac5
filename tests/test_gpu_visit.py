"""``benchmarks/gpu_visit.sh``: the dry run's archive, and the archive a killed visit leaves.

The dry run runs every phase on the CPU (Triton interpreter, tiny shapes; build and sanitizer
skipped with their reason) and must leave exactly one archive in OUTDIR with a summary, the
phases' verdicts, the results JSON and every phase's log. A visit killed during a phase, by
SIGKILL (nothing of it can react) or SIGTERM (its trap records the phase as interrupted), must
leave the archive of the phases before. The ops are narrowed (VISIT_OPS) to keep CI fast.
"""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_visit.sh"
PHASES = ["facts", "build", "check", "tests", "paths", "sanitizer", "speed", "compile", "report"]


def _env(work: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISIT_")}
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself
    # The script's `python` is this interpreter (a venv that is not activated included).
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    # One op timed, and no torch.compile (Inductor builds C++ for a minute on the CPU): the
    # compile phase runs the same code path as the speed phase with another impl.
    env.update(VISIT_WORK=str(work), VISIT_OPS="boom", VISIT_COMPILE_OPS="")
    # The caps are sized for a GPU machine; a loaded CI machine must not time a phase out.
    env.update({f"VISIT_CAP_{phase.upper()}": "600" for phase in PHASES})
    env.update(extra)
    return env


def _archive(outdir: Path) -> Path:
    archives = sorted(outdir.glob("gpu-visit-*.tar.gz"))
    assert len(archives) == 1, f"expected one archive in {outdir}, found {archives}"
    return archives[0]


def _read(archive: Path) -> dict:
    """``{path inside the archive's folder: text}``."""
    top = archive.name.removesuffix(".tar.gz")
    with tarfile.open(archive) as tar:
        out = {}
        for member in tar.getmembers():
            assert member.name.startswith(top + "/"), member.name
            out[member.name[len(top) + 1 :]] = tar.extractfile(member).read().decode()
    return out


def _verdicts(files: dict) -> dict:
    return {p["phase"]: p for p in json.loads(files["phases.json"])}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("visit")
    outdir = base / "out"
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(outdir)], cwd=ROOT,
                          env=_env(base / "work"), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    return outdir, done


def test_dry_run_leaves_one_archive_with_every_phase(dry_run):
    outdir, done = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(p.name for p in outdir.iterdir())
    assert len(files) <= 8, files
    assert not [f for f in files if f.endswith(".partial")], files
    archive = _archive(outdir)
    assert archive.name.endswith("-cpu.tar.gz")
    assert archive.stat().st_size <= 16 * 2**20
    content = _read(archive)
    verdicts = _verdicts(content)
    assert list(verdicts) != [] and set(verdicts) == set(PHASES)
    for name in ("build", "sanitizer"):
        assert verdicts[name]["verdict"] == "skipped", verdicts[name]
        assert "dry run" in verdicts[name]["reason"]
    assert verdicts["compile"]["verdict"] == "skipped", verdicts["compile"]
    assert verdicts["compile"]["reason"] == "no ops chosen"
    for name in ("facts", "check", "tests", "paths", "speed", "report"):
        assert verdicts[name]["verdict"] == "passed", (name, content.get(f"logs/{name}.log"))
        assert f"logs/{name}.log" in content
    summary = content["summary.md"]
    for name in PHASES:
        assert f"| {name} | {verdicts[name]['verdict']} |" in summary
    assert "All checks passed." in summary  # the device check's table
    rows = json.loads(content["results/cpu-smoke.json"])
    measured = {(r["op"], r["impl"]) for r in rows}
    assert measured == {("boom", "sha_rnn_kernels")}, measured
    assert {r["config"] for r in rows} == {"train", "eval"}
    assert "### boom" in summary
    assert "Speed of light" in summary
    # The same rows are in OUTDIR for benchmarks/report.py.
    assert json.loads((outdir / "cpu-smoke.json").read_text()) == rows


def _session_pids(session: int) -> list:
    """The processes of a session (the visit and every phase's children: `timeout` moves a
    phase into its own process group, not out of the session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == session and fields[0] != "Z":  # a zombie is dead, not yet reaped
            pids.append(int(entry.name))
    return pids


def _start_and_wait(tmp_path: Path, path: str):
    """Start a visit and return once ``path`` (under its folder) exists, inside the speed
    phase: the Boom's rows come in a second, the epoch's builds then take seconds more."""
    outdir, work = tmp_path / "out", tmp_path / "work"
    env = _env(work, VISIT_PHASES="facts,speed,report", VISIT_OPS="boom,epoch")
    proc = subprocess.Popen(["bash", str(SCRIPT), "--dry-run", str(outdir)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while not (tmp_path / path).exists():
        assert proc.poll() is None, f"the visit ended before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear in 240 s"
        time.sleep(0.1)
    return proc, outdir


def _kill_session(proc) -> None:
    """SIGKILL every process of the visit's session, until none is left (10 s at most)."""
    deadline = time.monotonic() + 10
    while True:
        pids = _session_pids(proc.pid)
        if not pids or time.monotonic() > deadline:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    proc.wait(timeout=30)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_killed_visit_keeps_the_archive_of_earlier_phases(tmp_path, how):
    # SIGKILL once the first row is written (each row is saved the moment it is measured);
    # SIGTERM once the speed phase has started.
    wait_for = "out/cpu-smoke.json" if how == "SIGKILL" else "work/logs/speed.log"
    proc, outdir = _start_and_wait(tmp_path, wait_for)
    try:
        if how == "SIGTERM":  # the visit itself: its trap stops the phase and packs
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=60) == 143
    finally:
        _kill_session(proc)  # SIGKILL: everything at once, nothing can pack
    assert not _session_pids(proc.pid)
    content = _read(_archive(outdir))
    verdicts = _verdicts(content)
    assert verdicts["facts"]["verdict"] == "passed"
    assert "torch:" in content["logs/facts.log"]
    summary = content["summary.md"]
    if how == "SIGTERM":
        assert verdicts["speed"]["verdict"] == "interrupted"
        assert "| report | not run |" in summary
    else:
        assert "speed" not in verdicts
        assert "| speed | not run |" in summary and "| report | not run |" in summary
        rows = json.loads((outdir / "cpu-smoke.json").read_text())
        assert rows and {r["op"] for r in rows} <= {"boom", "epoch"}, rows
        assert ("epoch", "sha_rnn_kernels") not in {(r["op"], r["impl"]) for r in rows}


def test_bad_arguments_are_refused(tmp_path):
    for args, needle in ((["--fast"], "unknown option --fast"),
                         (["a", "b"], "one OUTDIR at most")):  # fmt: skip
        done = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True,
                              text=True, env=_env(tmp_path / "w"), timeout=60)  # fmt: skip
        assert done.returncode == 2 and needle in done.stderr, done.stderr
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(tmp_path / "o")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env=_env(tmp_path / "w", VISIT_CAP_SPEED="ten"))  # fmt: skip
    assert done.returncode == 2 and "VISIT_CAP_SPEED must be a whole number" in done.stderr
    assert "got 'ten'" in done.stderr


STAND_IN_SMI = '#!/bin/sh\necho "NVIDIA H100 80GB HBM3"\n'
# compute-sanitizer's closing lines: racecheck's verdict comes from the test's parameter.
STAND_IN_SANITIZER = """#!/bin/sh
case "$*" in
  *racecheck*) printf '%s\\n' "$RACECHECK_SAYS"; exit "${RACECHECK_EXIT:-0}" ;;
  *) echo "========= ERROR SUMMARY: 0 errors" ;;
esac
"""


@pytest.mark.parametrize("says, code, verdict, status", [
    ("========= ERROR SUMMARY: 0 errors", "0", "passed", 0),
    ("Error: ERR_NVGPUCTRPERM - The user does not have permission", "1", "refused", 0),
    ("========= ERROR SUMMARY: 2 errors", "9", "failed", 1),
])  # fmt: skip
def test_gpu_path_with_stand_in_tools(tmp_path, says, code, verdict, status):
    """The non-dry path (names, sanitizer verdicts, exit status) with stand-ins for
    nvidia-smi and compute-sanitizer: the sanitizers' verdicts are read from their output."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("nvidia-smi", STAND_IN_SMI), ("compute-sanitizer", STAND_IN_SANITIZER)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = _env(tmp_path / "work", VISIT_PHASES="sanitizer,report", RACECHECK_SAYS=says,
               RACECHECK_EXIT=code)  # fmt: skip
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    outdir = tmp_path / "out"
    done = subprocess.run(["bash", str(SCRIPT), str(outdir)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == status, done.stdout + done.stderr
    archive = _archive(outdir)
    assert archive.name.endswith("-h100-80gb-hbm3.tar.gz")
    content = _read(archive)
    verdicts = _verdicts(content)
    assert verdicts["sanitizer"]["verdict"] == verdict, verdicts["sanitizer"]
    assert verdicts["report"]["verdict"] == "skipped"
    assert says in content["logs/sanitizer-racecheck.txt"]
    assert "ERROR SUMMARY: 0 errors" in content["logs/sanitizer-memcheck.txt"]
    summary = content["summary.md"]
    assert all(f"== {tool} (exit" in summary for tool in ("memcheck", "racecheck", "synccheck"))
