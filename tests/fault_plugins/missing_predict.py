"""An expert without `predict` (misspelled `predcit`): refused at registration."""
from fault_plugins import Plain, uniform
from synfer import hookimpl
from synfer.stages import Expert


class Lazy(Plain, Expert):
    name = "fault-nopredict"

    def predcit(self, images):
        return uniform(images)


@hookimpl
def register_stages(register):
    register(Lazy)
