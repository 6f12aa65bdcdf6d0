import sys

from benchmarks.wan.pipeline import main

sys.exit(main())
