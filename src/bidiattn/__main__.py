"""``python -m bidiattn``: the ``bidiattn`` command line (:func:`bidiattn.cli.main`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
