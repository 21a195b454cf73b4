"""An expert whose Config declares `weight` and `align`, which the core reads from the same `experts:` block:
the recipe's values would never reach the plugin. Refused at registration with the reserved list."""
from fault_plugins import Plain, uniform
from synfer import hookimpl
from synfer.stages import Expert, StageConfig


class Weighted(Plain, Expert):
    name = "fault-reserved"

    class Config(StageConfig):
        weight: float = 0.5  # meant as the plugin's own mixing weight
        align: bool = False

    def predict(self, images):
        return uniform(images)


@hookimpl
def register_stages(register):
    register(Weighted)
