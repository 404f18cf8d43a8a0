"""trackrelay's benchmark suite: programs that print numbers, not tests.

``python -m bench all`` measures every figure of issue 4 (R1-R7) next to its ceiling, measured
in the same run on the same machine, and prints one table. See ``python -m bench --help``.
"""
