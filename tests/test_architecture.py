"""The package's import graph: no cycle, and no import from a later stage into an earlier one."""

from __future__ import annotations

import ast
from pathlib import Path

import diffseg

PACKAGE = Path(diffseg.__file__).parent
# Stages that only read what every earlier stage wrote: nothing earlier may import them.
LATER_STAGES = {"evaluate": {"figures_clinician"}, "figures_clinician": {"figures", "figures_method"},
                "figures_method": {"figures"}, "figures": set(), "figures_risk": set(), "figures_review": {"predict"},
                "predict": set()}
TORCH_FREE = ("h5io", "postprocess", "calibration", "uncertainty", "crf", "risk", "evaluate", "export", "metrics",
              "review", "figures_common", "figures_clinician", "figures_review", "figures_risk")


def imports_of(path: Path) -> set[str]:
    """diffseg modules imported anywhere in the file (module level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffseg."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("diffseg."))
        if isinstance(node, ast.ImportFrom) and node.module == "diffseg":
            found.update(a.name for a in node.names if (PACKAGE / f"{a.name}.py").exists())
    return found


def import_graph() -> dict[str, set[str]]:
    return {p.stem: imports_of(p) - {p.stem} for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_reports_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_package_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"h5io", "postprocess", "runtime", "schedule", "inference", "evaluate"} <= set(graph)
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_no_earlier_stage_imports_a_later_one():
    for later, allowed in LATER_STAGES.items():
        importers = {module for module, deps in import_graph().items() if later in deps}
        assert importers <= allowed, f"{sorted(importers - allowed)} import diffseg.{later}"


def test_post_processing_stages_do_not_import_torch_code():
    """Uncertainty, CRF, evaluation and export read HDF5 and numpy only (no model code, no torch)."""
    graph = import_graph()
    torch_modules = {"runtime", "schedule", "inference", "ddpm", "train", "unet", "augment", "baselines"}
    for module in TORCH_FREE:
        reachable, todo = set(), [module]
        while todo:
            for dep in graph[todo.pop()] - reachable:
                reachable.add(dep)
                todo.append(dep)
        assert not reachable & torch_modules, f"diffseg.{module} reaches {sorted(reachable & torch_modules)}"
        source = (PACKAGE / f"{module}.py").read_text()
        assert "import torch" not in source, f"diffseg.{module} imports torch"


def test_settings_defaults_equal_the_schema_defaults():
    import yaml

    from diffseg.crf import CRFSettings
    from diffseg.inference import InferenceSettings

    schema = yaml.safe_load((PACKAGE.parents[1] / "config" / "schema.yaml").read_text())["properties"]
    for section, settings in (("inference", InferenceSettings()), ("crf", CRFSettings())):
        properties = schema[section]["properties"]
        fields = {k: v for k, v in vars(settings).items()}
        assert set(fields) == set(properties) - {"splits"}, section
        for key, value in fields.items():
            default = properties[key]["default"]
            assert (list(value) if isinstance(value, tuple) else value) == default, f"{section}.{key}"
