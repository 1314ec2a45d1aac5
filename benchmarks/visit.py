"""The helpers of ``benchmarks/gpu_visit.sh``: the machine's facts, the verdicts and the archive.

``python benchmarks/visit.py facts`` prints what the visit's reader needs to trust its figures
(GPU, driver, clocks, versions); ``python benchmarks/visit.py pack ...`` writes ``summary.md``
from the phases recorded so far and packs it with the results and the logs into the visit's one
archive, written under a temporary name and renamed, so that a visit killed at any moment leaves
the archive of the phases it finished. README.md ("A GPU visit") describes the phases.

Nothing here needs a GPU: the facts say what is missing, the packer reads files.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

if __package__ in (None, ""):  # run as a script: make `benchmarks` and the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VERDICTS = ("passed", "failed", "timed out", "refused", "skipped", "interrupted")
# One log may take this much of the archive (its end is kept: that is where errors are).
LOG_BYTES = int(os.environ.get("VISIT_LOG_BYTES", 2 * 2**20))
ARCHIVE_LIMIT = 16 * 2**20
SMI_FIELDS = (
    "name,driver_version,compute_cap,clocks.sm,clocks.max.sm,clocks.mem,power.limit,"
    "memory.total,persistence_mode"
)


def _command(argv: list, timeout: float = 20.0) -> str:
    """Output of a diagnostic command, or why it gave none (never raises)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return f"{argv[0]}: not installed"
    except subprocess.TimeoutExpired:
        return f"{argv[0]}: no answer within {timeout:.0f} s"
    text = (done.stdout + done.stderr).strip()
    return text if done.returncode == 0 else f"{argv[0]} (exit {done.returncode}): {text}"


def facts() -> int:
    """The GPU, its driver and clocks, the toolchain and package versions."""
    print("date (UTC):", time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()))
    print("nvidia-smi:", _command(["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv"]))
    print("nvidia-smi -q -d CLOCK,PERFORMANCE:")
    print(_command(["nvidia-smi", "-q", "-d", "CLOCK,PERFORMANCE"]))
    print("nvcc:", (_command(["nvcc", "--version"]) or "no output").splitlines()[-1])
    sanitizer = shutil.which("compute-sanitizer") or "not on PATH"
    print("compute-sanitizer:", sanitizer)
    import torch

    print("python:", sys.version.split()[0])
    print("torch:", torch.__version__, "| CUDA:", torch.version.cuda,
          "| cuDNN:", torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
          else None)  # fmt: skip
    try:
        import triton

        print("triton:", triton.__version__)
    except ImportError as exc:
        print("triton: not importable:", exc)
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gib = props.total_memory / 2**30
            print(f"cuda:{index}: {props.name}, sm_{props.major}{props.minor}, "
                  f"{props.multi_processor_count} SMs, {gib:.1f} GiB")  # fmt: skip
    else:
        print("torch.cuda.is_available(): False")
    from benchmarks.harness import git_commit

    print("commit:", git_commit())
    return 0


# ------------------------------------------------------------------------------------------
# summary and archive
# ------------------------------------------------------------------------------------------
def read_phases(work: str) -> list:
    """The phases recorded by gpu_visit.sh, one tab-separated line each:
    name, verdict, seconds, cap, log file, reason."""
    path = os.path.join(work, "phases.tsv")
    phases = []
    if not os.path.exists(path):
        return phases
    with open(path, encoding="utf-8") as f:
        for line in f:
            cells = line.rstrip("\n").split("\t")
            if len(cells) < 6:
                continue
            name, verdict, seconds, cap, log, reason = cells[:6]
            if not reason and verdict in ("failed", "interrupted"):
                reason = last_line(os.path.join(work, "logs", log))
            phases.append({"phase": name, "verdict": verdict, "seconds": int(seconds),
                           "cap_s": int(cap), "log": f"logs/{log}" if log else "",
                           "reason": reason})  # fmt: skip
    return phases


def last_line(path: str) -> str:
    """The last non-empty line of a log: pytest's and the tools' closing verdicts."""
    if not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 8192))
        lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines()]
    lines = [ln for ln in lines if ln]
    return lines[-1][:300] if lines else ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _section(path: str, title: str, start: str = "", limit: int = 60) -> list:
    """A log's lines from the last line starting with ``start``, as a fenced block."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    if start:
        found = [i for i, ln in enumerate(lines) if ln.startswith(start)]
        lines = lines[found[-1]:] if found else []
    if not lines:
        return []
    return ["", f"## {title}", "", "```", *lines[-limit:], "```"]


def measured_table(work: str, results: list) -> list:
    """The results' table (benchmarks/output.py), rendered again only when a results file
    changed since the last pack: rendering imports torch, seconds on a busy machine."""
    present = [p for p in results if os.path.exists(p)]
    key = [[p, os.stat(p).st_mtime_ns, os.stat(p).st_size] for p in present]
    cache = os.path.join(work, "measured.cache.json")
    if os.path.exists(cache):
        with open(cache, encoding="utf-8") as f:
            cached = json.load(f)
        if cached["key"] == key:
            return cached["lines"]
    rows = []
    for path in present:
        with open(path, encoding="utf-8") as f:
            rows += json.load(f)
    if rows:
        from benchmarks import output

        lines = ["ms: median of do_bench (CPU timer in a dry run); speedup = baseline ms / "
                 "impl ms, same device, same results file. The file merges these rows with "
                 "those of earlier runs on this device (each row records its commit).",
                 *output.table_lines(rows, markdown=True)]  # fmt: skip
    else:
        lines = ["No row measured yet."]
    with open(cache, "w", encoding="utf-8") as f:
        json.dump({"key": key, "lines": lines}, f)
    return lines


def summary(work: str, results: list, title: str, dry_run: bool, planned=()) -> str:
    phases = read_phases(work)
    done = {p["phase"] for p in phases}
    phases += [{"phase": name, "verdict": "not run", "seconds": 0, "cap_s": "", "log": "",
                "reason": "the visit stopped before this phase"}
               for name in planned if name not in done]  # fmt: skip
    lines = [f"# {title}", ""]
    if dry_run:
        lines += ["Dry run on the CPU (Triton interpreter, tiny shapes): it checks the visit "
                  "itself; none of its numbers is a GPU figure.", ""]  # fmt: skip
    facts_log = os.path.join(work, "logs", "facts.log")
    if os.path.exists(facts_log):
        with open(facts_log, encoding="utf-8", errors="replace") as f:
            lines += ["```", *f.read().splitlines()[:80], "```", ""]
    lines += ["| phase | verdict | seconds | cap (s) | reason | log |",
              "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for p in phases:
        lines.append(f"| {p['phase']} | {p['verdict']} | {p['seconds']} | {p['cap_s']} | "
                     f"{_cell(p['reason'])} | {p['log']} |")  # fmt: skip
    logs = os.path.join(work, "logs")
    lines += _section(os.path.join(logs, "check.log"), "Device checks", "op ")
    lines += _section(os.path.join(logs, "sanitizer.log"), "compute-sanitizer")
    lines += ["", "## Measured", "", *measured_table(work, results)]
    report = os.path.join(logs, "report.log")
    if os.path.exists(report):
        with open(report, encoding="utf-8", errors="replace") as f:
            lines += ["", "## Speed of light", "", *f.read().splitlines()[:80]]
    return "\n".join(lines) + "\n"


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
    tar.addfile(info, io.BytesIO(data))


def _tail_bytes(path: str, limit: int) -> bytes:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= limit:
            return f.read()
        f.seek(size - limit)
        note = f"[first {size - limit} bytes cut: the archive keeps a log's end]\n"
        return note.encode() + f.read()


def pack(work: str, archive: str, results: list, title: str, dry_run: bool, planned=()) -> int:
    """``summary.md``, ``phases.json``, the results and the logs into ``archive`` (atomically)."""
    text = summary(work, results, title, dry_run, planned)
    with open(os.path.join(work, "summary.md"), "w", encoding="utf-8") as f:
        f.write(text)
    top = os.path.basename(archive).removesuffix(".tar.gz")
    partial = os.path.join(os.path.dirname(archive), f".{top}.partial")
    with tarfile.open(partial, "w:gz") as tar:
        _add_bytes(tar, f"{top}/summary.md", text.encode())
        _add_bytes(tar, f"{top}/phases.json",
                   json.dumps(read_phases(work), indent=1).encode())  # fmt: skip
        for path in results:
            for candidate in (path, path.removesuffix(".json") + ".md"):
                if os.path.exists(candidate):
                    _add_bytes(tar, f"{top}/results/{os.path.basename(candidate)}",
                               _tail_bytes(candidate, ARCHIVE_LIMIT // 4))  # fmt: skip
        logs = os.path.join(work, "logs")
        for name in sorted(os.listdir(logs)) if os.path.isdir(logs) else ():
            path = os.path.join(logs, name)
            if os.path.isfile(path):
                _add_bytes(tar, f"{top}/logs/{name}", _tail_bytes(path, LOG_BYTES))
    size = os.path.getsize(partial)
    if size > ARCHIVE_LIMIT:  # a log flood: keep the summary and the results, drop the logs
        with tarfile.open(partial, "w:gz") as tar:
            _add_bytes(tar, f"{top}/summary.md", (text + "\nLogs left out: the archive passed "
                                                  "16 MiB with them.\n").encode())  # fmt: skip
    os.replace(partial, archive)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("facts", help="print the machine's facts")
    q = sub.add_parser("pack", help="write summary.md and the archive")
    q.add_argument("--work", required=True, help="the visit's working folder (logs, phases.tsv)")
    q.add_argument("--archive", required=True, help="the .tar.gz to (re)write")
    q.add_argument("--results", action="append", default=[], help="a results JSON to include")
    q.add_argument("--title", default="GPU visit")
    q.add_argument("--planned", default="", help="comma list of the phases the visit will run")
    q.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    if args.command == "facts":
        return facts()
    if not args.archive.endswith(".tar.gz"):
        p.error(f"--archive must end in .tar.gz; got {args.archive!r}")
    planned = [name for name in args.planned.split(",") if name]
    return pack(args.work, args.archive, args.results, args.title, args.dry_run, planned)


if __name__ == "__main__":
    sys.exit(main())
