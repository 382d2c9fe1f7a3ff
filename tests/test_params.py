"""params.yaml's schema: one definition per key, kept in step with params.yaml, dvc.yaml,
the code's imports and the README; one-line refusals; only result-changing keys rerun."""

from __future__ import annotations

import ast
import re

import pytest
import yaml
from conftest import ROOT, dvc, git, mlflow_runs, run, set_params

from stages import params
from stages.common import UserError

STAGES_DIR = ROOT / "stages"


# ---------------------------------------------------------------- the schema and the files

def test_params_yaml_holds_exactly_the_schema_keys_and_defaults():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params.flat_values(params.parse(raw)) == params.flat_values(params.Params())
    written = {f"{s}.{k}" if isinstance(v, dict) else s
               for s, v in raw.items() for k in (v if isinstance(v, dict) else [None])}
    assert written == {key.name for key in params.all_keys()}


def dvc_yaml_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", params.STAGES)
def test_each_stage_depends_on_exactly_the_keys_that_rerun_it(stage):
    listed = dvc_yaml_stages()[stage].get("params", [])
    assert listed == params.stage_params(stage)


def imported_modules(module: str) -> set[str]:
    """Every stages module that stages/<module>.py imports, directly or not (lazy imports too)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse((STAGES_DIR / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "stages":
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stages."):
                todo.append(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                todo += [a.name.split(".")[1] for a in node.names if a.name.startswith("stages.")]
    return seen


@pytest.mark.parametrize("stage", params.STAGES)
def test_each_stage_depends_on_every_module_it_imports(stage):
    deps = set(dvc_yaml_stages()[stage]["deps"])
    missing = {f"stages/{m}.py" for m in imported_modules(stage)} - deps
    assert not missing, f"dvc.yaml's {stage} stage lacks code it runs: {sorted(missing)}"


def test_the_import_walk_finds_lazy_imports():
    # models.predict imports stages.tensors inside the function: it must still be found.
    assert "tensors" in imported_modules("models")


def test_readme_params_table_is_the_schema():
    readme = (ROOT / "README.md").read_text()
    assert params.table() in readme, "README's params table is stale: paste " \
        "`python -m stages.params --table` over it"
    for key in params.all_keys():  # and the table is the generated one, a row per key
        assert re.search(rf"^\| `{re.escape(key.name)}` \|", readme, re.M)


def test_each_key_has_a_meaning_and_known_readers():
    for key in params.all_keys():
        assert key.meaning and key.accepts
        assert key.read_by and set(key.read_by) <= set(params.STAGES), key.name


# ---------------------------------------------------------------- one-line refusals

def parse_error(raw: dict) -> str:
    with pytest.raises(UserError) as err:
        params.parse(raw)
    return str(err.value)


def test_a_mistyped_key_is_refused_with_the_closest_name():
    assert parse_error({"train": {"flp": True}}) == \
        "params.yaml: train.flp is not a key of train: did you mean flip? (see README's Params)"
    assert "lrr is not a key of params.yaml: did you mean lr?" in parse_error({"lrr": 0.1})
    assert "train.zzz is not a key of train: its keys are seed, model," in \
        parse_error({"train": {"zzz": 1}})


@pytest.mark.parametrize("raw, line", [
    ({"train": {"epochs": "ten"}}, "train.epochs is 'ten': use a whole number >= 0"),
    ({"train": {"epochs": -1}}, "train.epochs is -1: use a whole number >= 0"),
    ({"train": {"epochs": 2.5}}, "train.epochs is 2.5: use a whole number >= 0"),
    ({"train": {"epochs": 0}}, "train.epochs is 0, which keeps only the head fitted on "
                               "pretrained features, but train.pretrained is null: set "
                               "train.epochs to 1 or more"),
    ({"train": {"epochs": 0, "pretrained": True, "head_first": False}},
     "train.epochs is 0, which keeps only the head fitted on pretrained features, but "
     "train.head_first is false: set train.epochs to 1 or more"),
    ({"index": {"val_fraction": 1.5}}, "index.val_fraction is 1.5: use a number >= 0 and < 1"),
    ({"index": {"max_pixels": 0}}, "index.max_pixels is 0: use a whole number >= 1 or null"),
    ({"train": {"workers": -1}}, "train.workers is -1: use auto or a whole number >= 0"),
    ({"train": {"data_on_device": "yes"}},
     "train.data_on_device is 'yes': use auto, true or false"),
    ({"train": {"flip": "yes"}}, "train.flip is 'yes': use true or false"),
    ({"train": {"schedule": "linear"}},
     "train.schedule is 'linear': use cosine, onecycle or constant"),
    ({"lr": True}, "lr is True: use a number > 0"),
    ({"train": 5}, "train must be a section of keys, like the one in the README's Params"),
])
def test_a_wrong_type_or_range_names_the_key_and_what_it_accepts(raw, line):
    assert parse_error(raw) == f"params.yaml: {line}"


def test_several_problems_are_one_line_that_counts_the_rest():
    line = parse_error({"train": {"epochs": -1, "workers": -1}, "lr": -1})
    assert "\n" not in line and line.endswith("(and 2 more keys to fix)")


def test_a_stage_refuses_a_typo_in_one_line_before_writing(clone_built):
    repo = clone_built()
    before = (repo / "data/manifest.csv").read_bytes()
    runs = len(mlflow_runs(repo))
    set_params(repo, index={"val_fracton": 0.3})  # sic
    done = run(["python", "-m", "stages.index"], repo, check=False)
    assert done.returncode == 1
    assert done.stderr == ("error: params.yaml: index.val_fracton is not a key of index: "
                           "did you mean val_fraction? (see README's Params)\n")
    assert (repo / "data/manifest.csv").read_bytes() == before
    assert len(mlflow_runs(repo)) == runs
    # Any stage checks the whole file, not just its own section.
    done = run(["python", "-m", "stages.evaluate"], repo, check=False)
    assert done.returncode == 1 and "index.val_fracton is not a key" in done.stderr
    assert "Traceback" not in done.stderr


def test_params_cli_checks_the_file_and_prints_the_table(tmp_path):
    assert "every key is known" in run(["python", "-m", "stages.params"], ROOT).stdout
    assert run(["python", "-m", "stages.params", "--table"], ROOT).stdout.strip() == \
        params.table()
    (tmp_path / "params.yaml").write_text("train:\n  epoch: 3\n")
    done = run(["python", "-m", "stages.params"], tmp_path, check=False,
               PYTHONPATH=str(ROOT))
    assert done.returncode == 1
    assert done.stderr.strip() == ("error: params.yaml: train.epoch is not a key of train: "
                                   "did you mean epochs? (see README's Params)")


# ---------------------------------------------------------------- what reruns

def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def test_register_as_reruns_evaluate_only(clone_built):
    repo = clone_built()
    out = dvc(repo, "exp", "run", "-S", "train.register_as=digits").stdout
    assert stages_run(out) == ["evaluate"]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    assert [m.name for m in client.search_registered_models()] == ["digits"]


def test_keys_that_change_no_result_rerun_nothing(clone_built):
    repo = clone_built()
    set_params(repo, workers=2, mlflow={"experiment": "elsewhere"},
               train={"log_every": 3, "workers": 1})
    assert "Data and pipelines are up to date" in dvc(repo, "status").stdout
    assert stages_run(dvc(repo, "repro").stdout) == []
    # A key that changes results does rerun, and so do the stages after it.
    set_params(repo, train={"flip": True})
    status = dvc(repo, "status").stdout
    assert "modified:           train.flip" in status and "log_every" not in status
    assert stages_run(dvc(repo, "repro").stdout) == ["train", "evaluate"]


# ---------------------------------------------------------------- the store

def test_a_relative_sqlite_store_is_at_the_repository_root(clone_built):
    repo = clone_built()
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", "built")
    # --temp runs in a copy under .dvc/tmp/exps: the store must still be the repo's own.
    out = dvc(repo, "exp", "run", "--temp", "-S", "evaluate.top_k=2",
              MLFLOW_TRACKING_URI="sqlite:///relative.db").stdout
    assert stages_run(out) == ["evaluate"]
    store = f"sqlite:///{repo / 'relative.db'}"
    evaluated = [r for r in mlflow_runs(repo, uri=store)
                 if r.data.tags.get("imgpipe.stage") == "evaluate"]
    assert len(evaluated) == 1 and evaluated[0].info.status == "FINISHED"
    assert "eval_accuracy" in evaluated[0].data.metrics
    assert not list((repo / ".dvc/tmp").rglob("relative.db"))


@pytest.mark.parametrize("uri, named", [("bogus://nowhere", "bogus://nowhere"),
                                         ("sqlite:////no/such/folder/m.db", "/no/such/folder")])
def test_a_store_that_cannot_be_used_is_one_line(clone_built, uri, named):
    repo = clone_built()
    done = run(["python", "-m", "stages.evaluate"], repo, check=False, MLFLOW_TRACKING_URI=uri)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named in errors[0] and "MLFLOW_TRACKING_URI" in errors[0]


def test_schema_defaults_build_the_sections_the_code_uses():
    p = params.Params()
    assert p.train.model == "smallcnn" and p.index.val_fraction == 0.2
    with pytest.raises(Exception, match="frozen"):
        p.train.epochs = 3  # loaded once, passed on, never changed on the way
