"""Shared test set-up.

- asyncio debug mode for every loop the tests create (DESIGN principle 7).
- Hypothesis profiles: `ci` (CI=true) is derandomized and has no deadline, so a CI run is
  reproducible and a loaded machine cannot fail a property test on time alone; `thorough`
  (HYPOTHESIS_PROFILE=thorough) runs 20 times the examples, for a deliberate bug hunt.
"""

import os

from hypothesis import settings

os.environ.setdefault("PYTHONASYNCIODEBUG", "1")

settings.register_profile("ci", derandomize=True, database=None, deadline=None)
settings.register_profile("thorough", max_examples=2000, deadline=None)
if os.environ.get("HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])
elif os.environ.get("CI"):
    settings.load_profile("ci")
