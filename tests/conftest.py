"""Shared test set-up: asyncio debug mode for every loop the tests create (DESIGN principle 7)."""

import os

os.environ.setdefault("PYTHONASYNCIODEBUG", "1")
