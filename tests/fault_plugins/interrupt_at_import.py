"""A KeyboardInterrupt raised by the module itself at import (no Ctrl-C was pressed): left out with one warning."""
raise KeyboardInterrupt
