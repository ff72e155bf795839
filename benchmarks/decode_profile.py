"""Same as ``vllm-fse bench profile`` (not named profile.py: a script directory comes first on sys.path, where that name would shadow the standard library's ``profile``, which torch imports)."""

import sys

from vllm_fse.bench.profile import main

if __name__ == "__main__":
    sys.exit(main())
