import sys
from pathlib import Path

try:
    import shardtune  # noqa: F401  (installed: `make setup` / `pip install -e .`)
except ImportError:  # a plain checkout: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from shardtune.cli import main

sys.exit(main(["launch", *sys.argv[1:]]))
