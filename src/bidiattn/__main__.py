"""``python -m bidiattn``: the ``bidiattn`` command line (:func:`bidiattn.tools.cli.main`)."""

import sys

from .tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
