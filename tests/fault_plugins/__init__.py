"""Third-party plugins with the faults of issues 20 and 40, one distribution each (tests/test_faults.py).

Each module is what a plugin author could plausibly write; the tests load them beside the
built-ins and the example plugin and assert the one clear error (or documented behaviour) each gets.
"""
import numpy as np

from synfer.stages import StageConfig


class Plain:
    """What every fault stage shares and gets right (mixed in before the stage kind)."""

    label_space = "affectnet8"

    class Config(StageConfig):
        pass


def uniform(images, classes: int = 8):
    return np.full((len(images), classes), 1 / classes)
