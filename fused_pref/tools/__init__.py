"""The tools around the library: parity check, ahead-of-time kernel report, memory accounting, demo and
benchmark, behind ``python -m fused_pref`` (``cli.py``).  They import :mod:`fused_pref` like any user
and nothing in the library imports them.
"""
