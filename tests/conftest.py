"""Shared fixtures; every test run gets its own BentoML home, never the user's."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
# Set before anything imports bentoml: the model store's location is read once.
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="bentoml-home-")
