"""Scale (issue 13): flat / HNSW / IVF / IVF-PQ over a sharded store of synthetic clustered vectors.

Runs :mod:`bench.bench_scale` (also a script: ``python bench/bench_scale.py --help``) at the profile's
size — cpu and gpu: 10⁶ × 128-d (flat, IVF, IVF-PQ; HNSW's build is too slow for 2 cores at 10⁶),
smoke: 5·10³ × 16-d — and reports, per index kind, its best QPS at recall@10 ≥ 0.95 against exact
search over the same store in the same run (target ≥ 10×), with bytes per vector and build time.
"""

from __future__ import annotations

import contextlib
import sys

from bench.common import Figure, Profile, log

ORDER = 60
TARGET_RECALL = 0.95
SIZES = {  # profile: (vectors, dim, IVF lists (0: vembed's default, 4·√N), IVF-PQ bits, kinds)
    "smoke": (5_000, 16, 32, 4, "flat,hnsw,ivf,ivfpq"),
    "cpu": (1_000_000, 128, 0, 8, "flat,ivf,ivfpq"),
    "gpu": (1_000_000, 128, 0, 8, "flat,ivf,ivfpq"),
}


def run(profile: Profile) -> list[Figure]:
    from bench.bench_scale import main

    n, dim, nlist, nbits, kinds = SIZES.get(profile.name, SIZES["cpu"])
    profile.workdir.mkdir(parents=True, exist_ok=True)
    log(f"scale: {n} x {dim}-d, kinds {kinds}")
    args = [
        "--n",
        str(n),
        "--dim",
        str(dim),
        "--nlist",
        str(nlist),
        "--pq-nbits",
        str(nbits),
        "--kinds",
        kinds,
    ]
    args += ["--threads", str(profile.threads), "--workdir", str(profile.workdir)]
    with contextlib.redirect_stdout(sys.stderr):  # the table goes to the log; stdout carries the figures
        report = main(args)
    figures = []
    for kind in report["kinds"]:
        good = [row for row in kind["sweep"] if row["recall@10"] >= TARGET_RECALL]
        best = (
            max(good, key=lambda row: row["qps"])
            if good
            else max(kind["sweep"], key=lambda r: r["recall@10"])
        )
        setting = ", ".join(f"{k}={v}" for k, v in best["knob"].items()) or "exact"
        figures.append(
            Figure(
                case="scale",
                what=f"{kind['kind']} QPS at recall@10 ≥ {TARGET_RECALL}, {n:,} × {dim}-d",
                value=best["qps"],
                baseline=report["exact_qps"],
                baseline_name="exact search (vembed)",
                unit="q/s",
                target=None if kind["kind"] == "flat" else 10.0,
                note=f"{setting}: recall@10 {best['recall@10']:.3f}; {kind['bytes_per_vector']:.0f} B/vector; "
                f"build {kind['build_s']:.0f} s",
                detail=kind,
            )
        )
    return figures
