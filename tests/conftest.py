import sys
from pathlib import Path

# Shared helpers live beside the tests (tests/helpers.py).
sys.path.insert(0, str(Path(__file__).parent))
