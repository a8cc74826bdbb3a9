import sys
from pathlib import Path

# The fold tests' shared checks live beside them (tests/folding/fold_checks.py), for tests/folding/rules/ too.
sys.path.insert(0, str(Path(__file__).parent))
