"""``python -m lsef_ext.cli`` runs the ``lsef`` command, as ``python -m lsef_cli`` does.

The command itself lives in the top-level module ``lsef_cli`` (so that ``lsef --help`` need not
import torch, which importing anything inside this package does); this module keeps the older
spelling working, e.g. for ``torchrun -m lsef_ext.cli``.
"""

import sys

from lsef_cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
