"""Same as ``vllm-fse bench profile``: see ``vllm_fse/bench/profile.py`` and the README's Benchmarks section."""

import sys

from vllm_fse.bench.profile import main

if __name__ == "__main__":
    sys.exit(main())
