"""``python -m megavlm`` (and ``torchrun -m megavlm``) = the ``megavlm`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
