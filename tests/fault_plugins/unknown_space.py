"""An expert in a label space synfer does not know (and does not declare it): refused at registration."""
from fault_plugins import Plain, uniform
from synfer import hookimpl
from synfer.stages import Expert


class CKExpert(Plain, Expert):
    name = "fault-ckplus"
    label_space = "ckplus7"

    def predict(self, images):
        return uniform(images, 7)


@hookimpl
def register_stages(register):
    register(CKExpert)
