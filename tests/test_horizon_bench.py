"""The horizon benchmark's own arithmetic: the growth-factor fit, the targets' verdicts, and
the mixed-mode section's modes, differences and table."""

from __future__ import annotations

import math

import pytest
import torch
from bench_helpers import load_benchmark

load_benchmark("compare_terms")  # puts benchmarks/ (the termbench package) on the path
from termbench.horizon import (  # noqa: E402
    MODE_KW,
    growth_factor,
    horizon_tables,
    horizon_targets,
)
from termbench.mixed_mode import MODES, _max_rel_diff, mixed_mode_table  # noqa: E402


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


def test_mixed_mode_section_compares_the_two_passes_it_names():
    assert [MODE_KW[m].get("second_order", "reverse") for m in MODES] == ["reverse", "forward"]
    assert all(MODE_KW[m]["checkpoint_every"] == "auto" for m in MODES)
    a = {n: {"w": torch.tensor([3.0, 4.0])} for n in ("total", "eq11", "eq12", "eq13", "eq14")}
    b = {n: {"w": v["w"].clone()} for n, v in a.items()}
    b["eq13"]["w"] = torch.tensor([3.0, 4.5])  # |diff| 0.5 of |a| 5
    a["eq14"]["w"] = b["eq14"]["w"] = torch.zeros(2)  # a zero term is skipped, not 0/0
    assert _max_rel_diff(a, b) == pytest.approx(0.1, rel=1e-6)
    row = dict(R=1, inner_steps=320, reps=3, reverse_s=5.0, forward_s=11.0,
               time_ratio_forward_over_reverse=2.2, reverse_mib=58.0, forward_mib=61.0,
               max_rel_diff=4.7e-7, loadavg_1min=7.3)  # fmt: skip
    text = mixed_mode_table([row], {"loadavg": {"before": (7, 6, 5), "after": (7, 7, 6)},
                                    "cpu_count": 2})  # fmt: skip
    assert "| 1 | 320 | 5 | 11 | 2.2 | 58 | 61 | 4.7e-07 | 7.3 |" in text
