"""``python -m fused_pref check | kernels | demo | memory | bench``: see :mod:`fused_pref.tools.cli`."""

import sys

from fused_pref.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
