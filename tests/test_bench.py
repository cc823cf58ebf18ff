"""The bench runner's machinery (no timing here): case discovery, figures, the RESULTS.md table."""

from __future__ import annotations

import math

from bench.__main__ import case_names, markdown
from bench.common import PROFILES, Figure, make_records


def test_every_case_module_is_found_in_order():
    names = case_names()
    assert {"embed", "retrieval", "loader", "train", "precision", "options"} <= set(names)
    assert names.index("embed") < names.index("retrieval") < names.index("train")
    assert set(PROFILES) == {"cpu", "gpu", "smoke"}


def test_ratios_read_as_speedups():
    throughput = Figure(
        "c", "img/s", value=300.0, baseline=100.0, baseline_name="naive", unit="img/s", target=1.5
    )
    assert throughput.ratio == 3.0 and throughput.meets_target
    seconds = Figure("c", "time", 2.0, 3.0, "faiss", "s", higher_is_better=False, target=1 / 1.1)
    assert seconds.ratio == 1.5 and seconds.meets_target
    missing = Figure("c", "x", float("nan"), 1.0, "b", "s")
    assert math.isnan(missing.ratio) and missing.to_json()["ratio"] is None and missing.meets_target is None


def test_results_table_names_machine_command_and_failures():
    run = {
        "date": "2026-12-01 12:00 UTC",
        "profile": "cpu",
        "machine": {
            "cpu": "Some CPU",
            "cores": 2,
            "cpu_bf16": True,
            "gpu": None,
            "torch": "2",
            "load_average": [3.0],
        },
        "command": "python -m bench",
        "seconds": 12.0,
        "cases": [
            {"case": "a", "figures": [Figure("a", "thing", 2.0, 1.0, "base", "img/s", target=1.5).to_json()]},
            {"case": "b", "error": "timed out after 9 s"},
        ],
    }
    text = markdown(run)
    assert "Some CPU, 2 cores" in text and "`python -m bench`" in text and "no GPU" in text
    assert "| a | thing | 2 img/s | base: 1 img/s | **2.00×** | ≥ 1.50× ✓ |" in text
    assert "| b | **failed**: timed out after 9 s |" in text


def test_generated_photos_have_sop_like_sizes(tmp_path):
    from PIL import Image

    from vembed.data.records import read_records

    records = read_records(make_records(tmp_path, 6, (400, 1000), fmt="jpg")).images()
    assert len(records) == 6
    for rec in records:
        with Image.open(rec.image) as img:
            assert img.format == "JPEG" and all(400 <= side <= 1000 for side in img.size)
