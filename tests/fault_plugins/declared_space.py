"""A plugin that declares its own label space (hook register_label_spaces) and an expert in it: loads and votes."""
from fault_plugins import Plain, uniform
from synfer import hookimpl
from synfer.stages import Expert


class CKExpert(Plain, Expert):
    name = "fault-ck-declared"
    label_space = "ckplus6"

    def predict(self, images):
        p = uniform(images, 6) * 0.24
        p[:, 0] = 0.8  # anger
        return p


@hookimpl
def register_label_spaces(register):
    register("ckplus6", ["angry", "disgusted", "fearful", "happy", "sad", "surprised"])


@hookimpl
def register_stages(register):
    register(CKExpert)
