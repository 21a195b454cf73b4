"""metrics.json says what made each number (judge, feature extractor, reference, counts), `synfer eval` reproduces a run's
metrics from its own recipe.json, and an evaluator's result is checked at the boundary: numbers only, NaN as null, no key
taken from another evaluator, one failure keeping the others' results."""
import json
import sys
import types

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from synfer.commands.cli import main
from synfer.stages import Evaluator, StageConfig


def _evaluator(name, result):
    class E(Evaluator):
        class Config(StageConfig):
            pass

        def evaluate(self, dataset, reference=None):
            if isinstance(result, Exception):
                raise result
            return result
    E.name = name
    E.__name__ = E.__qualname__ = name.title().replace("-", "")
    return E


BAD = [_evaluator("np-scalar", {"np_metric": np.float32(0.25), "np_int": np.int64(3)}),
       _evaluator("gives-nan", {"nan_metric": float("nan")}),
       _evaluator("steals-key", {"count": 0.123}),
       _evaluator("crashes", RuntimeError("judge file vanished")),
       _evaluator("gives-text", {"text_metric": "high"})]


@pytest.fixture
def env(monkeypatch):
    import dummy_plugins

    from synfer import hookimpl
    from synfer.engine import registry as plugins

    mod = types.ModuleType("metric_fault_plugins")
    mod.register_stages = hookimpl(lambda register: [register(c) for c in BAD])
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    reg = plugins.Registry()
    reg.load_entrypoints()
    reg.add(dummy_plugins, provider="tests")
    reg.add(mod, provider="faults")
    monkeypatch.setattr(plugins, "_REGISTRY", reg)
    return reg


def _recipe(tmp_path, evaluators):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"seed": 1, "num_images": 4, "output": str(tmp_path / "out"), "grid": False, "report": False,
                                    "generator": {"plugin": "dummy", "batch_size": 2}, "experts": [{"plugin": "dummy-expert"}],
                                    "evaluators": evaluators}))
    return path


def test_metrics_name_their_judge_and_eval_reproduces_the_run(tmp_path, env):
    evaluators = [{"plugin": "dummy-count"}, {"plugin": "fer-accuracy", "judge": "dummy-expert"}]
    res = CliRunner().invoke(main, ["run", str(_recipe(tmp_path, evaluators))])
    assert res.exit_code == 0, res.output
    path = tmp_path / "out" / "metrics.json"
    first = json.loads(path.read_text())
    prov = first["provenance"]
    assert prov["fer-accuracy"]["config"]["judge"] == "dummy-expert" and prov["fer-accuracy"]["plugin"] == "fer-accuracy"
    assert set(prov["fer-accuracy"]["metrics"]) >= {"fer_accuracy", "fer_accuracy_n"} and prov["dummy-count"]["metrics"] == ["count"]
    assert prov["dummy-count"]["dataset"] == {"rows": 4, "kept": first["count"]} and first["fer_accuracy_n"] >= 1
    # synfer eval with no --evaluators runs the run's own evaluators (recipe.json), not the procedural defaults
    path.unlink()
    res = CliRunner().invoke(main, ["eval", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "the evaluators of the run" in res.output
    assert json.loads(path.read_text()) == first


def test_evaluator_results_are_checked_and_one_failure_keeps_the_others(tmp_path, env):
    evaluators = [{"plugin": "dummy-count"}, *({"plugin": c.name} for c in BAD)]
    res = CliRunner().invoke(main, ["run", str(_recipe(tmp_path, evaluators))])
    assert res.exit_code == 1, res.output
    assert "3 evaluator(s) failed" in res.output
    assert "steals-key: returned count, already written by dummy-count" in res.output
    assert "crashes" in res.output and "judge file vanished" in res.output
    assert "gives-text" in res.output and "text_metric='high'" in res.output
    assert "evaluator 'gives-nan' gave nan_metric=nan; written as null" in res.output
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())  # valid JSON: NaN is null
    assert m["count"] == 4.0 and m["np_metric"] == 0.25 and m["np_int"] == 3.0 and m["nan_metric"] is None
    assert set(m["provenance"]) == {"dummy-count", "np-scalar", "gives-nan"}
    assert (tmp_path / "out" / "metadata.jsonl").read_text().count("\n") == 4  # the dataset is whole
    # a later `synfer eval` of another evaluator may not take a key the run's evaluator wrote
    res = CliRunner().invoke(main, ["eval", str(tmp_path / "out"), "--evaluators", "steals-key"])
    assert res.exit_code == 1 and "steals-key" in res.output and "dummy-count" in res.output, res.output


@pytest.mark.parametrize("fault, line", [
    ("fault-metric-clash", "fault-metric-clash: returned fer_accuracy, already written by fer-accuracy"),
    ("fault-metric-str", "evaluator 'fault-metric-str' returned acme_score='good' (str); expected a number"),
    ("fault-metric-list", "evaluator 'fault-metric-list' returned acme_score=[0.1, 0.2] (list); expected a number"),
    ("fault-metric-none", "evaluator 'fault-metric-none' returned NoneType; expected a dict of metric name -> number"),
    ("fault-metric-nan", "warning: evaluator 'fault-metric-nan' gave acme_score=nan; written as null"),
    ("fault-metric-numpy", None),
])
def test_issue_40_evaluator_faults_from_the_fault_package(tmp_path, env, fault, line):
    """tests/fault_plugins/evaluator_results.py, run beside the built-in fer-accuracy: one line naming the plugin, the
    built-in's number untouched, metrics.json valid JSON."""
    import fault_plugins.evaluator_results as faults

    env.add(faults, provider="acme-metrics")
    res = CliRunner().invoke(main, ["run", str(_recipe(tmp_path, [{"plugin": "fer-accuracy", "judge": "dummy-expert"}, {"plugin": fault}]))])
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["fer_accuracy"] != 0.123 and m["provenance"]["fer-accuracy"]["metrics"][0].startswith("fer_accuracy")
    if line is None:  # a numpy scalar is a number: converted
        assert res.exit_code == 0 and m["acme_score"] == 0.5 and isinstance(m["acme_score"], float), res.output
        return
    assert line in res.output, res.output
    assert res.exit_code == (0 if fault == "fault-metric-nan" else 1), res.output
