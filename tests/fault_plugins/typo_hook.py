"""A misspelled hook (`register_stage`): this plugin is left out with one warning; every other loads."""
from synfer import hookimpl
from synfer.stages import Evaluator, StageConfig


class Never(Evaluator):
    name = "fault-never"

    class Config(StageConfig):
        pass

    def evaluate(self, dataset, reference=None):
        return {}


@hookimpl
def register_stage(register):  # missing the 's'
    register(Never)
