"""`sys.exit(2)` inside register_stages (a missing dependency 'handled' by exiting): left out with one warning."""
import sys

from synfer import hookimpl


@hookimpl
def register_stages(register):
    sys.exit(2)
