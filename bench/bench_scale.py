"""Scale bench: flat / HNSW / IVF / IVF-PQ over a sharded store of 10⁶ synthetic clustered vectors.

    python bench/bench_scale.py --threads 1 --kinds flat,ivf,ivfpq      # N=10⁶ × 128-d (~8 min on 2 cores)
    python bench/bench_scale.py --threads 1 --n 100000                 # all four kinds at 10⁵

Data: N unit vectors around N/100 random centres (noise 0.6 per dimension relative to unit-variance
centres, so a vector's true top-10 are mostly, not only, from its own cluster), written as a vembed
store of 100,000-vector shards with :func:`vembed.index.vectors.write_vector_store`; the queries are
``--queries`` fresh vectors from the same distribution (not in the store). The reference is exact
search over the store shard by shard (:func:`vembed.index.vectors.exact_topk`, vembed's chunked matrix
product): its queries per second are the baseline every index is compared with, in the same run.

Each index kind runs in a fresh child process (its own peak RSS) that builds the index from the store
with :func:`vembed.index.faiss_index.build_store_index`, writes it, and searches the queries with
a sweep of its query-time knob (HNSW ``ef_search``, IVF ``nprobe``, IVF-PQ ``nprobe`` × ``rerank``).
Reported per setting: recall@10 against exact, QPS, speed-up over exact; per kind: build time, index
bytes per vector, and those bytes extrapolated to 10⁸ vectors (plus the store's own 4·dim bytes,
which IVF-PQ re-scoring reads from disk). The target (issue 13): ≥ 10× exact QPS at recall@10 ≥ 0.95.

Queries run in one batch with faiss's default OpenMP threads; ``--threads`` caps them (on a loaded
2-core machine one thread is often faster, see docs/scale.md).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TARGET_SPEEDUP, TARGET_RECALL = 10.0, 0.95
SHARD = 100_000
# Build settings: faiss's usual ones, with IVF training capped at 40 vectors per list (k-means on a
# sample; the defaults take 64 per list) so that 10⁶ vectors build in minutes on 2 cores.
BUILD = {  # vembed's defaults otherwise (IVF lists 4·√N, trained on 64 vectors per list)
    "hnsw": {"hnsw_m": 16, "ef_construction": 64},
    "ivfpq": {},
}
SWEEPS = {
    "flat": [{}],
    "hnsw": [{"ef_search": e} for e in (16, 32, 64, 128)],
    "ivf": [{"nprobe": p} for p in (4, 8, 16, 32, 64)],
    "ivfpq": [{"nprobe": p, "rerank": r} for p in (8, 16, 32) for r in (4, 16)],
}


def make_shards(n: int, dim: int, seed: int = 0, noise: float = 0.6):
    """Clustered unit vectors, ``SHARD`` at a time (never all N in memory at once)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, n // 100), dim)).astype(np.float32)
    for start in range(0, n, SHARD):
        rows = min(SHARD, n - start)
        x = centres[rng.integers(0, len(centres), rows)] + noise * rng.normal(size=(rows, dim)).astype(
            np.float32
        )
        yield x / np.linalg.norm(x, axis=1, keepdims=True)


def queries_like(n: int, dim: int, count: int) -> np.ndarray:
    """Fresh vectors from the store's distribution (same centres, another noise draw)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(max(1, n // 100), dim)).astype(np.float32)
    other = np.random.default_rng(1)
    x = centres[other.integers(0, len(centres), count)] + 0.6 * other.normal(size=(count, dim)).astype(
        np.float32
    )
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rss_mb() -> float:
    """This process' peak RSS (VmHWM: ``ru_maxrss`` would start from the parent's peak at fork)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_kind(kind: str, store: Path, work: Path, threads: int, nlist: int, pq_nbits: int = 8) -> dict:
    """Child process: build ``kind`` from the store, sweep its query knob; figures as a dict."""
    import faiss

    from vembed.index.faiss_index import build_store_index, save_index
    from vembed.index.vectors import StoreVectors
    from vembed.settings import IndexSettings

    if threads:
        faiss.omp_set_num_threads(threads)
    queries = np.load(work / "queries.npy")
    exact = np.load(work / "exact.npy")
    build = {**BUILD.get(kind, {}), **({"nlist": nlist} if kind in ("ivf", "ivfpq") and nlist else {})}
    settings = IndexSettings(**{**build, **({"pq_nbits": pq_nbits} if kind == "ivfpq" else {})})
    start = time.perf_counter()
    index = build_store_index(store, kind, settings, show_progress=False)
    build = time.perf_counter() - start
    save_index(index, store)
    size = (store / "index.faiss").stat().st_size
    vectors = StoreVectors(store)
    rows = []
    for knob in SWEEPS[kind]:
        s = settings.model_copy(update=knob)
        index.search(queries[:50], 10, s, vectors=vectors)  # warm caches
        start = time.perf_counter()
        _, found = index.search(queries, 10, s, vectors=vectors)
        seconds = time.perf_counter() - start
        hits = sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), exact.tolist(), strict=True))
        rows.append({"knob": knob, "recall@10": hits / exact.size, "qps": len(queries) / seconds})
    return {
        "kind": kind,
        "build_s": build,
        "bytes_per_vector": size / index.info["count"],
        "peak_rss_mb": rss_mb(),
        "info": {k: v for k, v in index.info.items() if k not in ("built", "metric")},
        "sweep": rows,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--kinds", default="flat,hnsw,ivf,ivfpq")
    parser.add_argument(
        "--nlist", type=int, default=0, help="IVF lists (index.nlist; 0: vembed's default, 4·√N)"
    )
    parser.add_argument("--pq-nbits", type=int, default=8, help="IVF-PQ bits per code (index.pq_nbits)")
    parser.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0: faiss's default)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(
            json.dumps(
                run_kind(
                    args.child, args.workdir / "store", args.workdir, args.threads, args.nlist, args.pq_nbits
                )
            )
        )
        return {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        return _bench(args, Path(tmp))


def _bench(args, work: Path) -> dict:
    import torch

    from vembed.index.vectors import exact_topk, write_vector_store

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    write_vector_store(work / "store", make_shards(args.n, args.dim))
    write_s = time.perf_counter() - start
    queries = queries_like(args.n, args.dim, args.queries)
    start = time.perf_counter()
    _, exact = exact_topk(work / "store", queries, 10)
    exact_s = time.perf_counter() - start
    exact_qps = args.queries / exact_s
    np.save(work / "queries.npy", queries)
    np.save(work / "exact.npy", exact.numpy())
    print(
        f"store: {args.n} x {args.dim}-d written in {write_s:.1f} s; exact search {exact_qps:.0f} QPS",
        file=sys.stderr,
    )
    results = []
    for kind in args.kinds.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            kind,
            "--workdir",
            str(work),
            "--threads",
            str(args.threads),
            "--nlist",
            str(args.nlist),
            "--pq-nbits",
            str(args.pq_nbits),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            print(f"{kind}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(result)
        print(f"{kind}: built in {result['build_s']:.1f} s", file=sys.stderr, flush=True)
    report = {
        "n": args.n,
        "dim": args.dim,
        "queries": args.queries,
        "threads": args.threads or "faiss default",
        "exact_qps": exact_qps,
        "store_bytes_per_vector": 4 * args.dim,
        "kinds": results,
    }
    print(table(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def table(report: dict) -> str:
    """Markdown: one row per kind and query setting, the best setting meeting the target in bold."""
    lines = [
        f"N = {report['n']:,} × {report['dim']}-d, {report['queries']} queries, exact search "
        f"{report['exact_qps']:.0f} QPS (faiss threads: {report['threads']})",
        "",
        "| kind | build s | bytes/vector | GiB at 10⁸ (+store) | peak RSS MB | setting | recall@10 | QPS | × exact |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    store_gib = report["store_bytes_per_vector"] * 1e8 / 2**30
    for kind in report["kinds"]:
        for i, row in enumerate(kind["sweep"]):
            speedup = row["qps"] / report["exact_qps"]
            good = row["recall@10"] >= TARGET_RECALL and speedup >= TARGET_SPEEDUP
            head = (
                [kind["kind"], f"{kind['build_s']:.0f}", f"{kind['bytes_per_vector']:.0f}",
                 f"{kind['bytes_per_vector'] * 1e8 / 2**30:.1f} (+{store_gib:.0f})", f"{kind['peak_rss_mb']:.0f}"]
                if i == 0 else ["", "", "", "", ""]
            )  # fmt: skip
            knob = ", ".join(f"{k}={v}" for k, v in row["knob"].items()) or "–"
            cells = [knob, f"{row['recall@10']:.3f}", f"{row['qps']:.0f}", f"{speedup:.1f}×"]
            if good:
                cells = [f"**{c}**" for c in cells]
            lines.append("| " + " | ".join(head + cells) + " |")
    lines.append("")
    lines.append(f"Bold: ≥ {TARGET_SPEEDUP:.0f}× exact QPS at recall@10 ≥ {TARGET_RECALL}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
