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
              "review", "settings", "methods", "figures_common", "figures_clinician", "figures_review",
              "figures_risk")
MAX_PARAMETERS = 12  # positional + keyword-only, self/cls not counted


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


def test_settings_is_a_torch_free_leaf():
    """diffseg.settings imports only the method registry, which imports no diffseg module (neither imports
    torch or numpy): the workflow's config check reads both."""
    graph = import_graph()
    assert graph["settings"] == {"methods"} and graph["methods"] == set()
    for module in ("settings", "methods"):
        source = (PACKAGE / f"{module}.py").read_text()
        assert "import torch" not in source and "import numpy" not in source, module


def test_settings_defaults_equal_the_schema_defaults():
    import yaml

    from diffseg import settings

    schema = yaml.safe_load((PACKAGE.parents[1] / "config" / "schema.yaml").read_text())["properties"]
    for cls in (settings.PrepareSettings, settings.TrainSettings, settings.HeadSettings, settings.BaselineSettings,
                settings.InferenceSettings, settings.CRFSettings):
        properties = schema[cls.SECTION]["properties"]
        fields = vars(cls())
        assert set(fields) == set(properties) - set(cls.IGNORED), cls.SECTION
        for key, value in fields.items():
            default = properties[key]["default"]
            assert (list(value) if isinstance(value, tuple) else value) == default, f"{cls.SECTION}.{key}"


def parameter_counts(path: Path) -> dict[str, int]:
    """{"module.function" or "module.Class.method": parameters} of every function in a file, self/cls not counted."""
    counts = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = child.args
                names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
                if isinstance(node, ast.ClassDef) and names and names[0] in ("self", "cls"):
                    names = names[1:]
                counts[f"{prefix}.{child.name}"] = len(names)
                visit(child, f"{prefix}.{child.name}")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}.{child.name}")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text()), path.stem)
    return counts


def test_parameter_counts_see_methods_and_keyword_only_arguments(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f(a, /, b, *args, c, **kw): pass\nclass C:\n    def m(self, x, *, y): pass\n"
                     "    @classmethod\n    def k(cls, z): pass\n")
    assert parameter_counts(probe) == {"probe.f": 3, "probe.C.m": 2, "probe.C.k": 1}


def test_no_function_takes_more_than_twelve_parameters():
    """A function with many options takes a settings object (diffseg.settings) instead of one keyword each."""
    counts = {name: n for path in sorted(PACKAGE.glob("*.py")) for name, n in parameter_counts(path).items()}
    over = {name: n for name, n in counts.items() if n > MAX_PARAMETERS}
    assert not over, f"functions with more than {MAX_PARAMETERS} parameters: {over}"
