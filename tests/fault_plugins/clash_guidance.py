"""A guidance classifier named like the built-in `tiny-cnn` (the built-in module keeps oracle-cnn and au-cnn)."""
from fault_plugins import Plain
from synfer import hookimpl
from synfer.stages import GuidanceClassifier


class AcmeTiny(Plain, GuidanceClassifier):
    name = "tiny-cnn"

    def forward(self, images):
        return images.mean(dim=(2, 3))[:, :1] * images.new_tensor([float(i) for i in range(8)])


@hookimpl
def register_stages(register):
    register(AcmeTiny)
