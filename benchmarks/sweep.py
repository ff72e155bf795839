"""Same as ``vllm-fse bench sweep``: see ``vllm_fse/bench/sweep.py`` and the README's Benchmarks section."""

import sys

from vllm_fse.bench.sweep import main

if __name__ == "__main__":
    sys.exit(main())
