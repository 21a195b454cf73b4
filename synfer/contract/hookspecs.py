"""Hook specifications. Plugin authors import only `synfer.hookimpl`."""
import pluggy

hookspec = pluggy.HookspecMarker("synfer")
hookimpl = pluggy.HookimplMarker("synfer")


@hookspec
def register_stages(register):
    """Hand stage classes (subclasses of synfer.contract.stages.Stage) to `register(cls)`."""


@hookspec
def register_label_spaces(register):
    """Declare new label spaces with `register(name, classes)`: classes are expression names in the model's output order."""


@hookspec
def register_commands(cli):
    """Add click commands to the `synfer` group `cli`; `cli.subgroup("train")` gives `synfer train`, and so on.
    A name synfer or an earlier plugin already has (`run`, `train generator`) is left out with a warning."""


HOOKS = tuple(name for name, f in list(globals().items()) if callable(f) and hasattr(f, "synfer_spec"))  # in declaration order
