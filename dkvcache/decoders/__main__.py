"""``python -m dkvcache.decoders``: the unigram-table CLI (see :mod:`dkvcache.unigram`)."""

from dkvcache.unigram import main

main()
