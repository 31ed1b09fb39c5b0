"""Convert an official teacher checkpoint: `python convert/dmt_convert.py SRC OUT [--format ...]`.

The same as the `dmt-convert` console script; the work is in dmt_jax/convert.py.
"""

import sys

from dmt_jax.convert import main

if __name__ == "__main__":
    sys.exit(main())
