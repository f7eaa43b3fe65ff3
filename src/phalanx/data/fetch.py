"""`python -m phalanx.data.fetch`: make sure the built-in Fashion-MNIST is present (used by `make`)."""
from __future__ import annotations

import sys

from phalanx.data.sources import cache_dir, find_fashion_mnist
from phalanx.errors import DataError


def main() -> int:
    try:
        folder = find_fashion_mnist(auto_install=True, cache=cache_dir())
    except DataError as e:
        print(f"phalanx: error: {e}", file=sys.stderr)
        return 1
    print(f"phalanx: Fashion-MNIST found in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
