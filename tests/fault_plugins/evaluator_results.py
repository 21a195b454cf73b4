"""Evaluators whose results break the contract (issue 40's evaluator rows; their handling is issue 38's metrics.json
work in synfer/engine/evaluate.py and synfer/engine/pipeline.py): a clashing key, NaN, a numpy scalar, a string, a list, None."""
import numpy as np

from synfer import hookimpl
from synfer.stages import Evaluator, StageConfig


def _evaluator(name, result):
    class Bad(Evaluator):
        class Config(StageConfig):
            pass

        def evaluate(self, dataset, reference=None):
            return result

    Bad.name, Bad.__name__ = name, name.title().replace("-", "")
    return Bad


BAD = [_evaluator("fault-metric-clash", {"fer_accuracy": 0.123}), _evaluator("fault-metric-nan", {"acme_score": float("nan")}),
       _evaluator("fault-metric-numpy", {"acme_score": np.float32(0.5)}), _evaluator("fault-metric-str", {"acme_score": "good"}),
       _evaluator("fault-metric-list", {"acme_score": [0.1, 0.2]}), _evaluator("fault-metric-none", None)]


@hookimpl
def register_stages(register):
    for cls in BAD:
        register(cls)
