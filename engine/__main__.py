"""``python -m cryogmm``: the same as the ``cryogmm`` command."""

import sys

from cryogmm.cli import main

if __name__ == "__main__":
    sys.exit(main())
