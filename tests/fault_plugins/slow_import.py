"""An import that takes a while (a heavy module imported at the top): named in one warning past SYNFER_SLOW_IMPORT_S."""
import time

from synfer import hookimpl

time.sleep(0.25)


@hookimpl
def register_label_spaces(register):
    pass
