"""``python -m skmml``: the command line of :mod:`skmml._cli`."""

from ._cli import main

raise SystemExit(main())
