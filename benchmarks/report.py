"""Same as ``vllm-fse bench report``: see ``vllm_fse/bench/report.py`` and the README's Benchmarks section."""

import sys

from vllm_fse.bench.report import main

if __name__ == "__main__":
    sys.exit(main())
