"""``python -m metagrad_rl ...`` (and ``torchrun -m metagrad_rl ...``): the ``metagrad-rl`` CLI."""

from metagrad_rl.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
