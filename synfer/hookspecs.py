"""Hook specifications. Plugin authors import only `synfer.hookimpl`."""
import pluggy

hookspec = pluggy.HookspecMarker("synfer")
hookimpl = pluggy.HookimplMarker("synfer")


@hookspec
def register_stages(register):
    """Hand stage classes (subclasses of synfer.stages.Stage) to `register(cls)`."""
