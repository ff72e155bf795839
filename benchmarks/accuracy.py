"""Same as ``vllm-fse bench accuracy``: see ``vllm_fse/bench/accuracy.py`` and the README's Benchmarks section."""

import sys

from vllm_fse.bench.accuracy import main

if __name__ == "__main__":
    sys.exit(main())
