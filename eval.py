"""The d2Cache framework's command, ``accelerate launch eval.py dataset.name=gsm8k ... model=dream-inst``, on dkvcache.

A thin wrapper around ``python -m dkvcache.eval`` (same arguments; see docs/eval.md).
"""

import sys

from dkvcache.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
