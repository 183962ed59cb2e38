"""Where the tests find the checkout and the shared data beside it (``../shared``), from any
folder of the test tree."""

from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SHARED = ROOT.parent / "shared"
