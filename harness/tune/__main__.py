"""`python -m harness.tune ...`, and `ray submit CLUSTER.yaml harness/tune/__main__.py -- ...`
(run as a file: it imports the installed package's driver, so Tune pickles the trainable by
reference to `harness.tune.trial`, not to this file)."""

import contextlib
import sys

from harness.tune.driver import main

if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
