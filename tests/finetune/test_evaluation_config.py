"""``evaluation:`` config: defaults, YAML building, and messages that say what to change."""

from __future__ import annotations

import pytest

from finetune.evaluation_config import EvaluationConfig, ShiftConfig
from medssl.config import build
from medssl.errors import ConfigError


def test_defaults_enable_calibration_only():
    cfg = EvaluationConfig()
    assert cfg.subgroups == [] and cfg.shift is None
    assert (cfg.min_subgroup_count, cfg.min_subgroup_per_class, cfg.calibration_bins) == (20, 5, 15)


def test_built_from_a_yaml_tree_with_a_single_holdout_name():
    cfg = build(EvaluationConfig, {"subgroups": ["sex", "site"], "shift": {"attribute": "site", "holdout": "H2"}})
    assert cfg.subgroups == ["sex", "site"]
    assert cfg.shift == ShiftConfig(attribute="site", holdout=["H2"], leave_one_out=False)
    assert build(EvaluationConfig, {"shift": {"leave_one_out": True}}).shift.leave_one_out


@pytest.mark.parametrize("tree, message", [
    ({"shift": {"holdout": ["H1"], "leave_one_out": True}}, "holdout and leave_one_out are exclusive"),
    ({"shift": {"attribute": "site"}}, r"name the held-out site values \(holdout: \[NAME\]\) or set leave_one_out"),
    ({"shift": {"attribute": "hospital", "holdout": ["H1"]}}, "attribute must be one of sex, age, site, view"),
    ({"shift": {"holdout": ["H1", "H1"]}}, "distinct non-empty names"),
    ({"subgroups": ["race"]}, r"\['race'\] unknown; choose from sex, age, site, view"),
    ({"subgroups": ["sex", "sex"]}, "duplicates"),
    ({"min_subgroup_count": 1}, "min_subgroup_count must be >= 2"),
    ({"min_subgroup_count": 8, "min_subgroup_per_class": 5}, "at least twice"),
    ({"calibration_bins": 1}, "calibration_bins must be between 2 and 100"),
])
def test_bad_values_name_the_key_and_the_fix(tree, message):
    with pytest.raises(ConfigError, match=message):
        build(EvaluationConfig, tree, where="run.yaml", prefix="evaluation.")


def _run_tree(**extra):
    return {"tasks": [{"name": "t", "kind": "shards", "path": "/x"}], **extra}


def test_shift_runs_the_cheap_protocols_of_the_grid_unless_told_otherwise():
    from finetune.config import FinetuneRunConfig

    cfg = build(FinetuneRunConfig, _run_tree(protocols=["knn", "linear", "finetune"], label_fractions=[0.1, 1.0],
                                             evaluation={"shift": {"leave_one_out": True}}))
    assert cfg.evaluation.shift_protocols(cfg.protocols) == ["knn", "linear"]
    assert cfg.evaluation.shift_fractions(cfg.label_fractions) == [0.1, 1.0]
    cfg = build(FinetuneRunConfig, _run_tree(protocols=["knn", "finetune"], label_fractions=[0.1, 1.0],
                                             evaluation={"shift": {"leave_one_out": True, "protocols": ["finetune"],
                                                                   "fractions": [1.0]}}))
    assert cfg.evaluation.shift_protocols(cfg.protocols) == ["finetune"]
    assert cfg.evaluation.shift_fractions(cfg.label_fractions) == [1.0]
    assert EvaluationConfig().shift_protocols(["knn"]) == [] and EvaluationConfig().shift_fractions([1.0]) == []


@pytest.mark.parametrize("extra, message", [
    ({"protocols": ["knn"], "evaluation": {"shift": {"leave_one_out": True, "protocols": ["linear"]}}},
     r"evaluation.shift.protocols \['linear'\] are not in protocols \['knn'\]"),
    ({"protocols": ["finetune"], "evaluation": {"shift": {"leave_one_out": True}}},
     "evaluation.shift runs no protocol: by default it reruns knn and linear"),
    ({"label_fractions": [1.0], "evaluation": {"shift": {"leave_one_out": True, "fractions": [0.5]}}},
     r"evaluation.shift.fractions \[0.5\] are not in label_fractions \[1.0\]"),
    ({"evaluation": {"shift": {"leave_one_out": True, "fractions": [0.0]}}}, r"fractions in \(0, 1\]"),
])
def test_shift_grid_mistakes_are_refused_before_work(extra, message):
    from finetune.config import FinetuneRunConfig

    with pytest.raises(ConfigError, match=message):
        build(FinetuneRunConfig, _run_tree(**extra))
