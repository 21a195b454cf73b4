"""Prints at import and registers a good expert: its print goes to stderr, `synfer plugins --json` stays JSON."""
from fault_plugins import Plain, uniform
from synfer import hookimpl
from synfer.stages import Expert

print("acme-chatty: loading weights lazily, hello!")


class Chatty(Plain, Expert):
    name = "fault-chatty"

    def predict(self, images):
        print("acme-chatty: predicting")  # stdout during a run: goes to stderr too
        return uniform(images)


@hookimpl
def register_stages(register):
    register(Chatty)
