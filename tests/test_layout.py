"""The layout targets of the redesign, measured on the source by ``benchmarks/layout.py``:
modules of ``metagrad_rl/`` of about 400 lines at most, functions of 60 lines at most
(docstrings aside), and the configuration object stopping where the bilevel trainer is built."""

from __future__ import annotations

import ast

from bench_helpers import load_benchmark

layout = load_benchmark("layout")

#: The bilevel trainer's functions that receive the whole config: the loop, the builder and
#: the checkpoint (its policy snapshot and run record); every step reads ``parts.settings``.
BILEVEL_CONFIG_TAKERS = {
    ("build.py", "build"),
    ("build.py", "build_problem"),
    ("build.py", "policy_optimizer"),
    ("build.py", "round_optimizer"),
    ("loop.py", "train"),
    ("settings.py", "of"),
    ("state.py", "to_checkpoint"),
}
#: Outside ``trainers/``, the modules that take a config: the CLI, the config helpers, the
#: run directory and the tabular test problem.
OUTSIDE_TRAINERS = {
    "metagrad_rl/cli.py",
    "metagrad_rl/config.py",
    "metagrad_rl/rundir.py",
    "metagrad_rl/testing/tabular/mdp.py",
}


def test_the_measure_sees_a_config_parameter_and_skips_the_docstring():
    src = 'def f(a, cfg):\n    """doc\n    more"""\n    return a\n\ndef g(x: "PPOConfig"): pass\n'
    f, g = ast.parse(src).body
    assert layout.takes_config(f) and layout.takes_config(g)
    assert not layout.takes_config(ast.parse("def h(settings, parts): pass").body[0])
    assert layout.function_length(f) == 4 - 2


def test_modules_and_functions_stay_small():
    m = layout.measure()
    big = [r for r in m["modules"] if int(r["lines"]) > 410]
    assert not big, f"modules over ~400 lines: {big}"
    long = [r for r in m["functions"] if int(r["lines"]) > 60]
    assert not long, f"functions over 60 lines (docstring aside): {long}"


def test_the_config_stops_where_the_bilevel_trainer_is_built():
    takers = layout.measure()["config"]
    bilevel = {
        (str(r["module"]).rsplit("/", 1)[1], str(r["function"]))
        for r in takers
        if "/trainers/bilevel/" in str(r["module"])
    }
    assert bilevel == BILEVEL_CONFIG_TAKERS
    outside = {str(r["module"]) for r in takers if "/trainers/" not in str(r["module"])}
    assert outside == OUTSIDE_TRAINERS
