"""The procedural face world (moved into a package; split by job in the next commit)."""
from synfer_plugins.procedural.face_parts import *  # noqa: F401,F403
from synfer_plugins.procedural.face_parts import register_stages  # noqa: F401
