import sys
from pathlib import Path

# The fold tests' shared checks live beside them (tests/fold/fold_checks.py), for tests/fold/rules/ too.
sys.path.insert(0, str(Path(__file__).parent))
