"""``python -m metagrad_rl ...`` (and ``torchrun -m metagrad_rl ...``): the ``metagrad-rl`` CLI."""

import os
import sys

from metagrad_rl.cli import main

if __name__ == "__main__":
    rc = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A worker of several: every file is written and closed by now. torch.distributed's
        # C++ threads can abort the interpreter's own teardown ("terminate called without an
        # active exception", exit 134) after a finished run, so leave without that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(rc or 0))
    raise SystemExit(rc)
