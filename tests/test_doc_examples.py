"""The documentation's examples (``docs/examples/``) run as written, at small sizes, and do
what their pages say."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_the_examples_page_includes_every_example_script():
    """Each script appears on the page through the snippet syntax (``--8<-- "path"``, kept
    from ``ruff format`` by ``<!-- fmt: off -->``, which would otherwise mangle it)."""
    page = (EXAMPLES.parent / "examples.md").read_text()
    included = re.findall(r'^--8<-- "docs/examples/(\w+\.py)"$', page, flags=re.M)
    assert sorted(included) == sorted(p.name for p in EXAMPLES.glob("*.py"))


def test_data_weights_lower_the_corrupted_examples_and_verify():
    res = load("data_weights").main(outer_steps=10, epochs=3, verbose=False)
    assert res["val_losses"][-1] < 0.5 * res["val_losses"][0]
    assert res["weight_corrupted"] < 0.5 < 1.0 < res["weight_clean"]
    assert res["verification_passed"]


def test_cln_on_hopper_writes_a_run(tmp_path):
    out = tmp_path / "cln"
    res = load("cln_hopper").main(
        str(out), total_steps=128, num_steps=64, num_minibatches=2, update_epochs=1
    )
    assert res["summary"]["global_step"] == 128 and res["summary"]["env"] == "Hopper-v5"
    assert [r["global_step"] for r in res["rows"]] == ["64", "128"]
    assert (out / "summary.json").is_file()


def test_a_registered_custom_policy_trains_with_ppo_and_evaluates(tmp_path):
    from metagrad_rl.checkpoint import load_checkpoint
    from metagrad_rl.networks import POLICIES

    try:
        mod = load("custom_policy")
        assert POLICIES["relu"] is mod.ReluGaussian
        out = tmp_path / "relu"
        res = mod.main(str(out), total_steps=128, num_steps=64, episodes=2, update_epochs=1)
        snap = load_checkpoint(out / "checkpoint.pt")["policy"]
    finally:
        POLICIES.pop("relu", None)
    assert res["summary"]["global_step"] == 128 and res["summary"]["env"] == "Hopper-v5"
    assert snap["kind"] == "relu" and set(snap["theta"]) >= {"mu.0.weight", "log_std"}
    assert len(res["returns"]) == 2 and all(np.isfinite(res["returns"]))


@pytest.mark.timeout(300)
def test_two_workers_count_both_workers_steps(tmp_path):
    rows = load("two_workers").main(str(tmp_path / "w2"), total_steps=128, num_steps=64)
    assert [(r["global_step"], r["all_workers_step"]) for r in rows] == [
        ("64", "128"),
        ("128", "256"),
    ]


def test_the_own_problem_pages_example_runs_and_verifies(capsys):
    page = (EXAMPLES.parent / "own-problem.md").read_text()
    code = page.split("## A 20-line example", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "own-problem.md", "exec"), {})
    assert "meta-gradient verification: PASSED" in capsys.readouterr().out
