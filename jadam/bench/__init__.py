"""Benchmark of one Adam step: jadam's layouts against optax (and torch when installed).

Run ``python -m jadam.bench --help``. Every implementation is measured in the
same run, interleaved round by round, so the ratios hold even on a busy
machine; see BENCHMARKS.md for the method and recorded results.
"""

from ._bench import CASES as CASES
from ._bench import IMPLS as IMPLS
from ._bench import main as main
from ._bench import run as run
