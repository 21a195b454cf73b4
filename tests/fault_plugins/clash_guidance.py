"""A guidance classifier named like the built-in `tiny-cnn` (the built-in module keeps oracle-cnn and au-cnn)."""
from synfer import hookimpl
from synfer.stages import GuidanceClassifier, StageConfig


class AcmeTiny(GuidanceClassifier):
    name = "tiny-cnn"
    label_space = "affectnet8"

    class Config(StageConfig):
        pass

    def forward(self, images):
        return images.mean(dim=(2, 3))[:, :1].repeat(1, 8) * 0.0 + images.new_tensor([float(i) for i in range(8)])


@hookimpl
def register_stages(register):
    register(AcmeTiny)
