"""Wall time and peak RAM of all-vs-all retrieval_metrics, against a naive full-matrix baseline.

    python bench/bench_retrieval.py                      # N=60000, dim=768, ~5 images per class (SOP-like)
    python bench/bench_retrieval.py --n 20000 --dim 384 --baseline-n 5000

Data: N random L2-normalised vectors around N/per_class random class centres (so the metrics are
neither 0 nor 1). Every measurement runs in a fresh child process so that its peak RSS
(``resource.getrusage().ru_maxrss``) is its own; "extra" is the peak minus the RSS with the inputs
already in memory. The naive baseline materialises the N×N similarity matrix and argsorts it; it is
run at ``--baseline-n`` (where it still fits), beside the chunked version at the same N, and checked
to give the same metrics.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from vembed.evaluation.retrieval import retrieval_metrics


def make_data(n: int, dim: int, per_class: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clustered unit vectors and their labels, built in place (no N×dim temporaries)."""
    gen = torch.Generator().manual_seed(seed)
    num_classes = max(1, round(n / per_class))
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    centres = torch.randn(num_classes, dim, generator=gen)
    x = torch.randn(n, dim, generator=gen).mul_(noise)
    for start in range(0, n, 8192):
        x[start : start + 8192] += centres[labels[start : start + 8192]]
    x.div_(x.norm(dim=1, keepdim=True))
    return x, labels


def naive_metrics(x: torch.Tensor, labels: torch.Tensor, ks: list[int]) -> dict[str, float]:
    """The textbook way: full N×N similarity, full stable argsort, metrics on the full ranking."""
    sims = x @ x.T
    sims.fill_diagonal_(float("-inf"))
    order = torch.argsort(sims, dim=1, descending=True, stable=True)[:, :-1]  # self is last
    del sims
    relevant = labels[order] == labels[:, None]
    del order
    r = relevant.sum(dim=1)
    used = r > 0
    relevant, r = relevant[used], r[used]
    ranks = torch.arange(1, relevant.shape[1] + 1)
    precision = relevant.cumsum(dim=1) / ranks
    ap = (precision * (relevant & (ranks <= r[:, None]))).sum(dim=1, dtype=torch.float64) / r
    metrics = {f"recall@{k}": float(relevant[:, :k].any(dim=1).float().mean()) for k in ks}
    metrics["map@r"] = float(ap.mean())
    metrics["num_queries"] = int(used.sum())
    return metrics


def rss_mib() -> float:
    """Current resident set size (Linux /proc), in MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def run_case(args: argparse.Namespace) -> dict:
    """One measurement, in this (child) process."""
    x, labels = make_data(args.n, args.dim, args.per_class, args.noise, args.seed)
    base = rss_mib()
    start = time.perf_counter()
    if args.case == "naive":
        metrics = naive_metrics(x, labels, args.ks)
    else:
        metrics = retrieval_metrics(x, labels, ks=args.ks, chunk_size=args.chunk_size)
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    return {
        "case": args.case,
        "n": args.n,
        "seconds": seconds,
        "peak_mib": peak,
        "extra_mib": peak - base,
        "metrics": metrics,
    }


def measure(args: argparse.Namespace, case: str, n: int) -> dict:
    """Run one case in a fresh interpreter and return its result."""
    cmd = [
        sys.executable,
        __file__,
        "--case",
        case,
        "--n",
        str(n),
        "--dim",
        str(args.dim),
        "--per-class",
        str(args.per_class),
        "--ks",
        ",".join(map(str, args.ks)),
        "--chunk-size",
        str(args.chunk_size),
        "--noise",
        str(args.noise),
        "--seed",
        str(args.seed),
    ]
    print(f"running {case} at N={n} ...", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=60000, help="items for the chunked run")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--per-class", type=int, default=5, help="mean images per class")
    parser.add_argument("--ks", type=lambda s: [int(k) for k in s.split(",")], default=[1, 10, 100, 1000])
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--baseline-n", type=int, default=10000, help="N for naive vs chunked; 0 to skip")
    parser.add_argument("--noise", type=float, default=2.5, help="within-class spread relative to centres")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--case", choices=["chunked", "naive"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:
        print(json.dumps(run_case(args)))
        return

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; dim={args.dim}, ks={args.ks}, "
        f"~{args.per_class} per class, chunk_size={args.chunk_size}",
        flush=True,
    )
    results = []
    if args.baseline_n:
        results += [measure(args, "naive", args.baseline_n), measure(args, "chunked", args.baseline_n)]
    if args.n != args.baseline_n or not args.baseline_n:
        results.append(measure(args, "chunked", args.n))

    print(
        f"\n{'method':<8} {'N':>7} {'time s':>8} {'peak RSS MiB':>13} {'extra MiB':>10} "
        f"{'recall@1':>9} {'map@r':>7} {'queries':>8}"
    )
    for res in results:
        m = res["metrics"]
        print(
            f"{res['case']:<8} {res['n']:>7} {res['seconds']:>8.2f} {res['peak_mib']:>13.0f} "
            f"{res['extra_mib']:>10.0f} {m['recall@1']:>9.4f} {m['map@r']:>7.4f} {m['num_queries']:>8}"
        )

    if args.baseline_n:
        naive, chunked = results[0], results[1]
        same = all(abs(naive["metrics"][key] - chunked["metrics"][key]) < 1e-6 for key in naive["metrics"])
        print(
            f"\nat N={args.baseline_n}: naive / chunked = {naive['seconds'] / chunked['seconds']:.1f}x time, "
            f"{naive['extra_mib'] / chunked['extra_mib']:.1f}x extra RAM; same metrics: {same}"
        )
        # The naive method holds N² float32 scores plus N² int64 sort indices at least.
        need_gib = args.n**2 * 12 / 2**30
        print(f"naive at N={args.n} would need at least {need_gib:.0f} GiB for scores + argsort indices")


if __name__ == "__main__":
    main()
