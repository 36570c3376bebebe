"""``python -m dkvcache.lm_eval --model dkvcache --model_args … --tasks …``: lm-eval's own CLI with our model.

lm-eval 0.4.x finds models only through its registry, so this imports :mod:`dkvcache.eval.lm_eval_adapter`
(which registers ``dkvcache``) and then hands the command line to ``lm_eval.__main__.cli_evaluate`` unchanged
(``accelerate launch -m dkvcache.lm_eval …`` for data parallelism). Absolute imports throughout: this module's
name never shadows the ``lm_eval`` package.
"""

from __future__ import annotations

import sys


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    import dkvcache.eval.lm_eval_adapter  # noqa: F401  (registers the "dkvcache" model)

    cli_evaluate()


if __name__ == "__main__":
    sys.exit(main())
