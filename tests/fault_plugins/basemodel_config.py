"""A Config on pydantic's BaseModel (typos in a recipe would be silently ignored): refused at registration."""
import numpy as np
from pydantic import BaseModel

from synfer import hookimpl
from synfer.stages import Expert


class LooseExpert(Expert):
    name = "fault-loose"
    label_space = "affectnet8"

    class Config(BaseModel):
        confidence: float = 0.9

    def predict(self, images):
        return np.full((len(images), 8), 1 / 8)


@hookimpl
def register_stages(register):
    register(LooseExpert)
