"""``metagrad-rl``: train, plot and evaluate from the command line.

``train`` takes one ``--flag`` per field of the chosen algorithm's config dataclass (its field
docstring is the help text), so adding an algorithm to
:data:`metagrad_rl.trainers.ALGOS` adds its flags here. Every bad input -- a ConfigError, an
argparse error -- is one line ``metagrad-rl: error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from metagrad_rl import config as C
from metagrad_rl.errors import ConfigError, DivergenceError

PROG = "metagrad-rl"
DEFAULT_ALGO = "ppo"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one-line :class:`ConfigError` s."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_args(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One flag per dataclass field; unset flags stay absent from the namespace."""
    from metagrad_rl.config import field_docs

    docs = field_docs(config_cls)
    choices = config_cls.field_choices() if hasattr(config_cls, "field_choices") else {}
    group = parser.add_argument_group(f"{config_cls.__name__} (hyperparameters)")
    for f in dataclasses.fields(config_cls):
        default = f.default
        help_text = f"{docs.get(f.name, '')} (default: {default!r})".replace("%", "%%")
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text, "dest": f.name}
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, tuple):
            kw.update(nargs="+", type=int, metavar="N")
        elif f.name in choices:
            kw["choices"] = choices[f.name]
        elif isinstance(default, int | float | str):
            kw["type"] = type(default)
            kw["metavar"] = f.name.upper()
        group.add_argument(_flag(f.name), **kw)


def build_parser(algo: str = DEFAULT_ALGO) -> argparse.ArgumentParser:
    """The full parser; ``train`` gets the flags of ``algo``'s config (and it as --algo's
    default, so that ``--resume`` without ``--algo`` takes the resumed run's)."""
    parser = _Parser(
        prog=PROG,
        description="Meta-gradient RL with learned intrinsic rewards (PPO, LIRPG, CLN).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_train(sub, algo)
    _add_plot(sub)
    _add_evaluate(sub)
    return parser


def _add_train(sub: Any, algo: str) -> None:
    """``train``: run-directory flags, workers, and the flags of ``algo``'s config."""
    from metagrad_rl.trainers import ALGOS, launch

    algos = "; ".join(f"{k}: {a.help}" for k, a in sorted(ALGOS.items()))
    train = sub.add_parser(
        "train",
        help="train an agent",
        description=f"Train an agent. Algorithms -- {algos}. "
        "`metagrad-rl train --algo NAME --help` lists that algorithm's flags.",
    )
    train.add_argument(
        "--algo",
        choices=sorted(ALGOS),
        default=algo if algo in ALGOS else DEFAULT_ALGO,
        help="algorithm (default: ppo; with --resume, the resumed run's)",
    )
    train.add_argument(
        "--out", required=True, metavar="DIR", help="run directory (logs, checkpoint)"
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint with its config.json's algorithm "
        "and settings (a flag that contradicts them is an error); --total-steps may change: "
        "then the learning-rate annealing restarts where the run resumes (back to --lr, to 0 "
        "at the new total)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in --out, deleting an earlier run's files there",
    )
    train.add_argument(
        "--config",
        metavar="FILE",
        help="settings from a TOML or JSON file with the flags' names (e.g. total-steps = "
        "100000; an `algo` key picks the algorithm); a run's config.json works too; flags "
        "given on the command line win",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    launch.add_worker_flags(train)
    add_config_args(train, ALGOS[algo if algo in ALGOS else DEFAULT_ALGO].config_cls)
    train.set_defaults(func=cmd_train)


def _add_plot(sub: Any) -> None:
    plot = sub.add_parser(
        "plot",
        help="plot learning curves of run directories",
        description="Learning curves: mean and +-1 std over seeds, one panel per env; runs are "
        "grouped by the config.json settings that differ between them (seed aside), and the "
        "legend names the algorithm and those settings (e.g. `cln, meta_grad=exact`).",
    )
    plot.add_argument("runs", nargs="+", metavar="DIR", help="run directories (train --out)")
    plot.add_argument(
        "--out", required=True, metavar="FILE", help="output figure (.png, .pdf or .svg)"
    )
    plot.add_argument(
        "--metric", default="episodic_return", help="progress.csv column (default: %(default)s)"
    )
    plot.add_argument("--title", default="", help="figure title")
    plot.add_argument(
        "--label",
        action="append",
        metavar="TEXT",
        help="legend label of each DIR, once per DIR in the same order (replaces the settings "
        "in the legend; runs given the same label are averaged as seeds of one curve)",
    )
    plot.set_defaults(func=cmd_plot)


def _add_evaluate(sub: Any) -> None:
    ev = sub.add_parser(
        "evaluate",
        help="run a saved policy and print its mean return",
        description="Run a checkpoint's policy (mean action) and print its mean raw return.",
    )
    ev.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="a checkpoint.pt file, or a run directory (train --out) holding one",
    )
    ev.add_argument("--episodes", type=int, default=10, help="episodes (default: %(default)s)")
    ev.add_argument("--seed", type=int, default=0, help="env seed (default: %(default)s)")
    ev.add_argument("--stochastic", action="store_true", help="sample actions instead of the mean")
    ev.set_defaults(func=cmd_evaluate)


def join_negative_values(argv: Sequence[str]) -> list[str]:
    """``--flag -1e-3`` as ``--flag=-1e-3``: argparse takes a token such as ``-1e-3`` (unlike
    ``-1`` or ``-0.5``) for an option and would say ``expected one argument``; joined, the
    value reaches the config's validation, which names it."""
    import re

    number = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|-inf|-nan", re.IGNORECASE)
    out: list[str] = []
    for a in argv:
        prev = out[-1] if out else ""
        if number.fullmatch(a) and prev.startswith("--") and "=" not in prev:
            out[-1] = f"{prev}={a}"
        else:
            out.append(a)
    return out


def _peek(argv: Sequence[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _peek_algo(argv: Sequence[str]) -> str:
    """``--algo``; with ``--resume`` and no ``--algo``, the resumed run's (its config.json)."""
    algo = _peek(argv, "--algo")
    if algo is not None:
        return algo
    path = _peek(argv, "--config")
    if path:
        from metagrad_rl.config import read_config_file

        try:
            algo = read_config_file(path)[0]
        except ConfigError:
            algo = None  # reported when the config is read for real
        if algo is not None:
            return algo
    out = _peek(argv, "--out")
    if "--resume" in argv and out:
        from metagrad_rl.rundir import CONFIG_FILE

        try:
            saved = json.loads((Path(out) / CONFIG_FILE).read_text())
            return str(saved["algo"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # the resume itself reports what is wrong with the directory
    return DEFAULT_ALGO


# -- commands -------------------------------------------------------------------------------------
def make_train_config(args: argparse.Namespace) -> Any:
    """The config from explicit flags, on top of the resumed run's config with ``--resume``."""
    from metagrad_rl.checkpoint import load_checkpoint
    from metagrad_rl.config import from_dict, read_config_file
    from metagrad_rl.rundir import resume_checkpoint
    from metagrad_rl.trainers import ALGOS

    cls = ALGOS[args.algo].config_cls
    explicit = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name in args}
    if args.config:
        algo, from_file = read_config_file(args.config)
        if algo is not None and algo != args.algo:
            raise ConfigError(
                f"--algo={args.algo!r} differs from {args.config!r}'s algo={algo!r}: expected "
                "one of them, or the same"
            )
        from_file = C.check_types(cls, from_file, where=f"--config {args.config!r}: ")
        explicit = {**from_file, **explicit}
    base: dict[str, Any] = {}
    if args.resume:
        ckpt = load_checkpoint(resume_checkpoint(args.out))
        if ckpt.get("algo") != args.algo:
            raise ConfigError(
                f"--algo={args.algo!r} differs from the resumed run's {ckpt.get('algo')!r}: "
                "leave --algo out to resume with the run's own"
            )
        base = dict(ckpt["config"])
    return from_dict(cls, {**base, **explicit})


def rounding_note(config: Any) -> str | None:
    """One line when ``total_steps`` is not a whole number of rollouts (it is rounded down)."""
    done = config.num_iterations * config.batch_size
    if done == config.total_steps:
        return None
    return (
        f"note: --total-steps {config.total_steps} is not a multiple of the rollout "
        f"(num_steps * num_envs = {config.batch_size}): training {done} steps "
        f"({config.num_iterations} iterations)"
    )


def cmd_train(args: argparse.Namespace) -> int:
    from metagrad_rl.distributed import init_workers
    from metagrad_rl.trainers import launch
    from metagrad_rl.trainers.rollout_workers import rollout_workers

    nproc, mode = launch.workers_of(args)
    if nproc > 1 and mode == "allreduce":
        make_train_config(args)  # bad input: one line here, not one per worker
        argv = launch.without_flag(getattr(args, "argv", None) or sys.argv[1:], "--nproc")
        return launch.launch_local(nproc, argv, args.worker_timeout)
    device = str(getattr(args, "device", None) or "cpu")
    C.torch_device("device", device)  # one line before any process group is joined
    with rollout_workers(nproc, args.worker_timeout):
        with init_workers(device, timeout_s=args.worker_timeout) as w:
            return _train_worker(args, w.is_main)


class _ProgressReport:
    """The trainers' ``progress(step, row)``: a tqdm bar with the last return and steps/s,
    and a line every ``every`` iterations. The bar (and ``note``) start at the first report,
    so that bad input prints one line only and the rate covers whole iterations."""

    def __init__(self, total: int, every: int, note: str | None, disable: bool) -> None:
        self.total, self.every, self.note, self.disable = total, every, note, disable
        self.bar: Any = None
        self.iterations, self.last = 0, ""

    def __call__(self, step: int, row: dict[str, Any]) -> None:
        if self.bar is None:
            from tqdm import tqdm

            if self.note is not None:  # printed once the run is known to be valid
                print(self.note)
            self.bar = tqdm(
                total=self.total,
                initial=step,
                unit="step",
                disable=self.disable,
                dynamic_ncols=True,
            )
        self.bar.update(step - self.bar.n)
        sps = f"{row.get('steps_per_sec', 0):.0f}"
        ret = row.get("episodic_return", "")
        if ret != "":
            self.last = f"{ret:.1f}"
            self.bar.set_postfix(ret=self.last, sps=sps)
        self.iterations += 1
        if self.iterations % self.every == 0:
            self.bar.write(f"step {step:>9d}  episodic_return {self.last or '-':>8}  steps/s {sps}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _train_worker(args: argparse.Namespace, is_main: bool) -> int:
    from metagrad_rl.trainers import ALGOS, parallel

    # rank 0's (with --resume only its file system needs the run directory)
    config = parallel.current().main_first(lambda: make_train_config(args), share=True)
    if not is_main:
        args.no_progress = True
    if args.overwrite and is_main:
        if args.resume:
            raise ConfigError("--overwrite and --resume exclude each other: expected one of them")
        from metagrad_rl.rundir import clear_run_dir

        clear_run_dir(args.out)
    report = _ProgressReport(
        total=config.num_iterations * config.batch_size,
        every=max(1, getattr(config, "num_iterations", 10) // 10),
        note=rounding_note(config),
        disable=args.no_progress,
    )
    try:
        summary = ALGOS[args.algo].train(config, args.out, resume=args.resume, progress=report)
    finally:
        report.close()
    if not is_main:
        return 0
    ret = summary.get("mean_return_last_20_episodes")
    ret_s = "n/a" if ret is None else f"{ret:.1f}"
    print(
        f"done: {summary['algo']} on {summary['env']} seed {summary['seed']}, "
        f"{summary['global_step']} steps in {summary['wall_time_s']:.0f}s; "
        f"mean return of the last 20 episodes: {ret_s}; logs in {args.out}"
    )
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from metagrad_rl.plotting import plot_runs

    path, notes = plot_runs(
        args.runs, args.out, metric=args.metric, title=args.title, labels=args.label
    )
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from metagrad_rl.evaluate import evaluate_checkpoint

    returns = evaluate_checkpoint(
        args.checkpoint, args.episodes, args.seed, deterministic=not args.stochastic
    )
    print(
        f"mean return over {len(returns)} episodes: {np.mean(returns):.1f} "
        f"(std {np.std(returns):.1f}, min {np.min(returns):.1f}, max {np.max(returns):.1f})"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``metagrad-rl`` console script; returns the exit code."""
    from metagrad_rl.distributed import OutOfSyncError, WorkerLostError
    from metagrad_rl.trainers.parallel import PeerConfigError

    argv = join_negative_values(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(_peek_algo(argv)).parse_args(argv)
        args.argv = argv
        return int(args.func(args))
    except PeerConfigError:
        return 2  # rank 0 prints it
    except (ConfigError, DivergenceError) as err:
        msg = " ".join(str(err).split())
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    except (WorkerLostError, OutOfSyncError) as err:
        msg = " ".join(str(err).split())
        print(
            f"{PROG}: error: {msg}; resume from the last checkpoint with --resume", file=sys.stderr
        )
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
