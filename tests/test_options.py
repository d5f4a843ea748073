"""MetaGradOptions: the engine's shared settings, as keywords or as one object, checked once."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch
import torchopt
from meta_helpers import make_setup

from metagrad_rl import MetaGradOptions, meta_gradient, start_meta_gradient
from metagrad_rl.errors import ConfigError
from metagrad_rl.meta_problem import InnerSurrogate
from metagrad_rl.options import MetaGradKeywords
from metagrad_rl.pytree import PARTS


def _same(a, b) -> None:
    for part in PARTS:
        x, y = getattr(a, part), getattr(b, part)
        assert (x is None) == (y is None), part
        if x is not None:
            for k in x:
                assert torch.equal(x[k], y[k]), (part, k)


def test_options_object_and_keywords_give_bit_identical_results():
    problem, theta, eta, rounds, outer = make_setup(n_rounds=2, steps=2)
    tx = torchopt.adam(0.05, eps_root=1e-8)
    kw = dict(surrogate="detached", denominator="theta_k+1", truncate=3, checkpoint_every=2)
    by_kw = meta_gradient(problem, tx, theta, eta, rounds, outer, **kw)
    by_obj = meta_gradient(problem, tx, theta, eta, rounds, outer, options=MetaGradOptions(**kw))
    _same(by_kw, by_obj)
    # a keyword replaces the object's field
    mixed = meta_gradient(
        problem, tx, theta, eta, rounds, outer, options=MetaGradOptions(**kw), terms=False
    )
    assert mixed.eq11 is None
    for k in mixed.total:
        torch.testing.assert_close(mixed.total[k], by_kw.total[k], rtol=1e-10, atol=1e-12)


def test_the_denominator_of_the_options_is_finish_s_default():
    problem, theta, eta, rounds, outer = make_setup(n_rounds=1, steps=2)
    tx = torchopt.sgd(0.1)
    pending = start_meta_gradient(problem, tx, theta, eta, rounds, denominator="theta_k+1")
    assert pending.options.denominator == "theta_k+1"
    late = pending.finish(outer)
    explicit = meta_gradient(problem, tx, theta, eta, rounds, outer, denominator="theta_k+1")
    _same(late, explicit)


def test_each_field_is_checked_when_the_options_are_built():
    assert MetaGradOptions(surrogate="detached").surrogate is InnerSurrogate.DETACHED
    bad = {
        "surrogate": ("exact", r"surrogate='exact' is invalid"),
        "denominator": ("theta", r"denominator='theta' is invalid"),
        "truncate": (-1, r"truncate=-1 is invalid"),
        "checkpoint_every": (0, r"checkpoint_every=0 is invalid"),
        "second_order": ("forward", r"second_order='forward' needs checkpoint_every"),
        "memory_budget_bytes": (0, r"memory_budget_bytes=0 is invalid"),
    }
    for field, (value, message) in bad.items():
        with pytest.raises(ConfigError, match=message):
            MetaGradOptions(**{field: value})
        with pytest.raises(ConfigError, match=message):
            MetaGradOptions.of(None, **{field: value})


def test_an_unknown_keyword_is_a_type_error_naming_the_fields():
    problem, theta, eta, rounds, outer = make_setup(n_rounds=1, steps=1)
    with pytest.raises(TypeError, match=r"'trunc'.*truncate"):
        meta_gradient(problem, torchopt.sgd(0.1), theta, eta, rounds, outer, trunc=2)
    with pytest.raises(ConfigError, match="options is a dict"):
        MetaGradOptions.of({"truncate": 2})  # type: ignore[arg-type]


def test_the_keywords_type_lists_every_field():
    fields = {f.name for f in dataclasses.fields(MetaGradOptions)}
    assert set(typing.get_type_hints(MetaGradKeywords)) == fields
