"""An expert in a label space synfer does not know (and does not declare it): refused at registration."""
import numpy as np

from synfer import hookimpl
from synfer.stages import Expert, StageConfig


class CKExpert(Expert):
    name = "fault-ckplus"
    label_space = "ckplus7"

    class Config(StageConfig):
        pass

    def predict(self, images):
        return np.full((len(images), 7), 1 / 7)


@hookimpl
def register_stages(register):
    register(CKExpert)
