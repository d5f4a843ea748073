"""`metagrad-rl plot` tells runs apart: grouping by differing config fields, notes, formats."""

from __future__ import annotations

import json

from metagrad_rl.cli import main
from metagrad_rl.plotting import group_curves


def _run(root, name, algo="cln", steps=3, metric=True, **config):
    d = root / name
    d.mkdir()
    cfg = {"env": "Hopper-v5", "seed": 1, "torch_threads": 1, **config}
    (d / "config.json").write_text(json.dumps({"algo": algo, "config": cfg}))
    head = "global_step,episodic_return" if metric else "global_step,other"
    rows = [f"{64 * (i + 1)},{float(i + config.get('seed', 1))}" for i in range(steps)]
    (d / "progress.csv").write_text("\n".join([head, *rows]) + "\n")
    return str(d)


def test_runs_are_grouped_by_every_differing_field_seed_aside(tmp_path):
    runs = [
        _run(tmp_path, "a1", meta_grad="eq17", seed=1),
        _run(tmp_path, "a2", meta_grad="eq17", seed=2, torch_threads=4),
        _run(tmp_path, "b1", meta_grad="exact", seed=1),
        _run(tmp_path, "p1", algo="ppo", seed=1),
    ]
    groups, notes = group_curves(runs)
    assert sorted(label for _, label in groups) == [
        "cln, meta_grad=eq17",
        "cln, meta_grad=exact",
        "ppo",
    ]
    assert len(groups[("Hopper-v5", "cln, meta_grad=eq17")]) == 2 and notes == []
    same, _ = group_curves(runs[:2])  # only the seed differs: one group named by its algo
    assert list(same) == [("Hopper-v5", "cln")]


def test_plot_reports_left_out_runs_and_cut_curves_and_picks_the_format(capsys, tmp_path):
    runs = [
        _run(tmp_path, "a1", meta_grad="eq17", seed=1, steps=4),
        _run(tmp_path, "a2", meta_grad="eq17", seed=2, steps=2),
        _run(tmp_path, "x", meta_grad="eq17", seed=3, metric=False),
    ]
    assert main(["plot", *runs, "--out", str(tmp_path / "c.svg")]) == 0
    out = capsys.readouterr().out
    assert f"note: left out {runs[2]}: no logged 'episodic_return' values" in out
    assert (
        "note: cut 'cln' at step 128, the shortest of its 2 runs (the longest reaches 256)" in out
    )
    assert b"<svg" in (tmp_path / "c.svg").read_bytes()[:500]
    assert main(["plot", *runs[:1], "--out", str(tmp_path / "c.pdf")]) == 0
    assert (tmp_path / "c.pdf").read_bytes()[:4] == b"%PDF"
    assert main(["plot", *runs[:1], "--out", str(tmp_path / "c.jpg")]) == 2
    err = capsys.readouterr().err
    assert "has the extension 'jpg': expected one of .png, .pdf, .svg" in err
    assert not (tmp_path / "c.jpg").exists()


def test_png_is_png(tmp_path):
    run = _run(tmp_path, "a", meta_grad="eq17")
    assert main(["plot", run, "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
