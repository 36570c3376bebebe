"""``python -m dkvcache.eval`` (and ``accelerate launch -m dkvcache.eval``)."""

import sys

from dkvcache.eval.cli import MODULE_PROG, main

if __name__ == "__main__":
    sys.exit(main(prog=MODULE_PROG))
