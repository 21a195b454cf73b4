"""An expert named `tiny-cnn`: in the experts slot, where guidance classifiers vote too, it clashes with the built-in."""
from fault_plugins import Plain, uniform
from synfer import hookimpl
from synfer.stages import Expert


class AcmeTinyExpert(Plain, Expert):
    name = "tiny-cnn"

    def predict(self, images):
        return uniform(images)


@hookimpl
def register_stages(register):
    register(AcmeTinyExpert)
