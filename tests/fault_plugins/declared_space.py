"""A plugin that declares its own label space (hook register_label_spaces) and an expert in it: loads and votes."""
import numpy as np

from synfer import hookimpl
from synfer.stages import Expert, StageConfig


class CKExpert(Expert):
    name = "fault-ck-declared"
    label_space = "ckplus6"

    class Config(StageConfig):
        pass

    def predict(self, images):
        p = np.full((len(images), 6), 0.04)
        p[:, 0] = 0.8  # anger
        return p


@hookimpl
def register_label_spaces(register):
    register("ckplus6", ["angry", "disgusted", "fearful", "happy", "sad", "surprised"])


@hookimpl
def register_stages(register):
    register(CKExpert)
