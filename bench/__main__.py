"""``python -m bench``: run every bench case, write the figures as JSON, append them to bench/RESULTS.md.

    python -m bench                      # CPU profile: tiny/small shapes, minutes on 2 cores
    python -m bench --gpu                # GPU profile: dinov2-base bf16 at 224 px, <= 10 minutes
    python -m bench --only retrieval,embed --no-record
    python -m bench --list

Each case runs in a fresh interpreter (its own memory peak and torch state) with a time limit; a case
that fails or runs out of time is reported as such and the others still run. Every figure is a ratio
against a baseline measured in the same run (see bench/common.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import math
import pkgutil
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"
NOT_CASES = {"common", "__main__"}


def case_names() -> list[str]:
    """Every module of the bench package with ``ORDER`` and a ``run`` function, in ``ORDER``.

    Other modules (stand-alone scripts such as ``bench/quality.py``) are not cases.
    """
    found = []
    for info in pkgutil.iter_modules([str(HERE)]):
        if info.name in NOT_CASES or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"bench.{info.name}")
        if isinstance(getattr(module, "ORDER", None), int) and callable(getattr(module, "run", None)):
            found.append((module.ORDER, info.name))
    return [name for _, name in sorted(found)]


def run_case_here(name: str, profile_name: str, workdir: Path, overrides: list[str]) -> None:
    """Child process: run one case, print its figures as one JSON line on stdout."""
    from bench.common import PROFILES

    profile = PROFILES[profile_name]
    fields = {**profile.__dict__, "workdir": workdir}
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in fields or key in ("name", "workdir"):
            raise SystemExit(f"--set {item}: not a profile field ({', '.join(sorted(fields))})")
        fields[key] = type(fields[key])(value)
    profile = type(profile)(**fields)
    if profile.threads:
        import torch

        torch.set_num_threads(profile.threads)
    module = importlib.import_module(f"bench.{name}")
    figures = module.run(profile)
    print(json.dumps([f.to_json() for f in figures]))


def run_case(name: str, profile: str, workdir: Path, timeout: float, overrides: list[str]) -> dict:
    """Run one case in a child interpreter; its figures, or its error."""
    cmd = [sys.executable, "-m", "bench", "--case", name, "--profile", profile, "--workdir", str(workdir)]
    cmd += [arg for item in overrides for arg in ("--set", item)]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        return {"case": name, "error": f"timed out after {timeout:.0f} s", "seconds": timeout}
    seconds = round(time.perf_counter() - start, 1)
    if done.returncode != 0:
        return {"case": name, "error": f"exit {done.returncode} (see stderr)", "seconds": seconds}
    lines = done.stdout.strip().splitlines()
    return {"case": name, "figures": json.loads(lines[-1]) if lines else [], "seconds": seconds}


def fmt(x, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        x = f"{x:.3g}" if abs(x) < 100 else f"{x:,.0f}"
    return f"{x} {unit}".strip()


def markdown(run: dict) -> str:
    """One RESULTS.md section: date, machine, command, a table of ratios."""
    m = run["machine"]
    gpu = m["gpu"] or "no GPU"
    lines = [
        f"## {run['date']} — profile `{run['profile']}`",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores (native bf16: {'yes' if m['cpu_bf16'] else 'no'}), "
        f"{gpu}; torch {m['torch']}, threads per case: {run.get('threads', 'torch default')}; "
        f"load average at start {m['load_average']}",
        f"- command: `{run['command']}` ({run['seconds']:.0f} s)",
        "",
        "| case | what | vembed / option | baseline | ratio | target | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in run["cases"]:
        if "error" in case:
            lines.append(f"| {case['case']} | **failed**: {case['error']} | | | | | |")
            continue
        for f in case["figures"]:
            target = f"≥ {f['target']:.2f}×" if f.get("target") else ""
            if f.get("meets_target") is not None:
                target += " ✓" if f["meets_target"] else " ✗"
            ratio = "–" if f["ratio"] is None else f"**{f['ratio']:.2f}×**"
            lines.append(
                f"| {f['case']} | {f['what']} | {fmt(f['value'], f['unit'])} | "
                f"{f['baseline_name']}: {fmt(f['baseline'], f['unit'])} | {ratio} | {target} | {f['note']} |"
            )
    lines.append("")
    lines.append(
        "Ratios read as speed-ups (>1: vembed or the option is faster; for times, baseline / vembed)."
    )
    return "\n".join(lines) + "\n\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--profile", choices=["cpu", "gpu", "smoke"], default=None, help="sizes (default: cpu)"
    )
    parser.add_argument("--gpu", action="store_true", help="same as --profile gpu")
    parser.add_argument("--only", default="", help="comma-separated cases to run (default: all)")
    parser.add_argument("--skip", default="", help="comma-separated cases to leave out")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per case at most (default 900)")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole run (default: 570 with --gpu, else none)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="results file (default bench/results-PROFILE.json; with --no-record in the temp folder)",
    )
    parser.add_argument(
        "--no-record",
        action="store_true",
        help="do not append to bench/RESULTS.md nor write bench/results-*.json",
    )
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a profile size (bench/common.py Profile), e.g. --set retrieval_n=60000",
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)  # child process: run one case
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    profile = args.profile or ("gpu" if args.gpu else "cpu")

    if args.case:
        run_case_here(args.case, profile, args.workdir or Path(tempfile.mkdtemp()), args.set)
        return
    names = case_names()
    if args.list:
        for name in names:
            doc = (importlib.import_module(f"bench.{name}").__doc__ or "").strip().splitlines()
            print(f"{name:<12} {doc[0] if doc else ''}")
        return
    only = {n.strip() for n in args.only.split(",") if n.strip()}
    skip = {n.strip() for n in args.skip.split(",") if n.strip()}
    unknown = (only | skip) - set(names)
    if unknown:
        parser.error(f"unknown case(s) {', '.join(sorted(unknown))}; cases: {', '.join(names)}")
    selected = [n for n in names if (not only or n in only) and n not in skip]

    from bench.common import PROFILES, machine
    from vembed.io import write_json

    run = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "profile": profile,
        "machine": machine(),
        "command": shlex.join(["python", "-m", "bench", *sys.argv[1:]]),
        "threads": PROFILES[profile].threads or "torch default",
        "cases": [],
    }
    start = time.perf_counter()
    budget = args.budget if args.budget is not None else (570.0 if profile == "gpu" else float("inf"))
    with tempfile.TemporaryDirectory(prefix="vembed-bench-") as tmp:
        for name in selected:
            left = budget - (time.perf_counter() - start)
            if left < 20:
                run["cases"].append({"case": name, "error": f"skipped: the {budget:.0f} s budget is spent"})
                continue
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            result = run_case(name, profile, Path(tmp) / name, min(args.timeout, left), args.set)
            run["cases"].append(result)
            for f in result.get("figures", []):
                print(f"[bench]   {f['what']}: ratio {f['ratio']} vs {f['baseline_name']}", file=sys.stderr)
            if "error" in result:
                print(f"[bench]   {name} failed: {result['error']}", file=sys.stderr)
    run["seconds"] = time.perf_counter() - start
    # --no-record leaves the tracked files alone: the figures go to the temp folder unless --json says
    default = Path(tempfile.gettempdir()) if args.no_record else HERE
    out = args.json or default / f"results-{profile}.json"
    write_json(out, run)
    text = markdown(run)
    print(text)
    if not args.no_record:
        previous = RESULTS_MD.read_text() if RESULTS_MD.is_file() else "# Bench results\n\n"
        from vembed.io import write_text

        write_text(RESULTS_MD, previous + text)
    print(f"figures: {out}" + ("" if args.no_record else f"; table appended to {RESULTS_MD}"))
    if any("error" in c for c in run["cases"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
