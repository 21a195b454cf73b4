"""An expert without `predict` (misspelled `predcit`): refused at registration."""
import numpy as np

from synfer import hookimpl
from synfer.stages import Expert, StageConfig


class Lazy(Expert):
    name = "fault-nopredict"
    label_space = "affectnet8"

    class Config(StageConfig):
        pass

    def predcit(self, images):
        return np.full((len(images), 8), 1 / 8)


@hookimpl
def register_stages(register):
    register(Lazy)
