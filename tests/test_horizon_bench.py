"""The horizon benchmark's own arithmetic: the growth-factor fit and the targets' verdicts."""

from __future__ import annotations

import math

import pytest
from bench_helpers import load_benchmark

load_benchmark("compare_terms")  # puts benchmarks/ (the termbench package) on the path
from termbench.horizon import growth_factor, horizon_tables, horizon_targets  # noqa: E402


def test_growth_factor_recovers_a_geometric_sequence():
    rows = [{"R": r, "norm_total": 3.0 * 1.7**r} for r in range(1, 11)]
    assert growth_factor(rows) == pytest.approx(1.7, rel=1e-12)
    noisy = [
        {"R": r, "norm_total": 2.0 * 0.5**r * (1.1 if r % 2 else 1 / 1.1)} for r in range(1, 9)
    ]
    assert growth_factor(noisy) == pytest.approx(0.5, rel=0.05)


def test_targets_pass_and_miss_by_their_limits():
    row = dict(R=1, inner_steps=320, k=18, stored_mib=700.0, checkpointed_mib=60.0, stored_s=3.0,
               checkpointed_s=2.0, time_ratio=2.0 / 3.0, estimate_stored_mib=590.0,
               estimate_checkpointed_mib=70.0, max_rel_diff=1e-7)  # fmt: skip
    big = dict(row, R=10, inner_steps=3200, checkpointed_mib=600.0, time_ratio=1.7)
    verdicts = {name: v for name, _, _, v in horizon_targets([row, big])}
    assert verdicts["R = 1 checkpointed, MiB above baseline"] == "PASS"
    assert verdicts["R = 10 checkpointed, MiB above baseline"] == "MISS"  # 600 > 512
    assert verdicts["time checkpointed / stored at R = 1"] == "PASS"
    assert verdicts["time checkpointed / stored at R = 10"] == "MISS"  # 1.7 > 1.6
    assert "590 / 70" in horizon_tables([row]) and not math.isnan(row["time_ratio"])
