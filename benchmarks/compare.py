"""The comparison benchmark as a script: ``python benchmarks/compare.py [options]`` is
``python -m fused_pref bench [options]`` (the machinery lives in ``fused_pref.benchmark``,
``fused_pref.peers`` and ``fused_pref.report``; ``--help`` lists the options)."""

import sys

from fused_pref.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
