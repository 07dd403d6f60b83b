"""Nothing lost, nothing silent: the run directory never removes what a run did not write, hostile or careless
recipe files end in one clear line and a non-zero exit, and killed runs leave nothing that is not cleaned up."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from recipes import apply
from recipes.recipe_yaml import MAX_DEPTH, load_recipe_yaml_text
from recipes.run_dir import RUN_MARKER, STAGING_MARKER, remove_stale_staging
from recipes.schema import RecipeError, parse_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def inside_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def digits_recipe(**train):
    """A digits MLP recipe of a few seconds (network trimming, one iteration)."""
    return {"name": "digits-quick", "task": "image_classification",
            "model": {"architecture": "digits_mlp", "widths": [32, 16]},
            "train": {"epochs": 2, "batch_size": 64, **train},
            "pruning": [{"pruning_type": "network_trimming", "target_sparsity": 0.25, "retrain": {"epochs": 1}}]}


def text_recipe(**stage):
    return {"name": "r", "model": {"asset": "minilm-l6"},
            "pruning": [{"pruning_type": "wanda", "target_sparsity": 0.5, **stage}]}


def write_recipe(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def one_clean_error(capsys, argv) -> str:
    """Runs the CLI, which must exit 2 with an error and no traceback; returns what it printed."""
    capsys.readouterr()  # what earlier runs printed
    assert apply.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


# --- the run directory ----------------------------------------------------------------------------------------


def test_the_working_directory_is_never_a_run_directory(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml", digits_recipe())
    (tmp_path / "notes.txt").write_text("mine")
    before, parent_before = snapshot(tmp_path), sorted(tmp_path.parent.iterdir())
    for run_dir in (".", "..", str(tmp_path)):
        err = one_clean_error(capsys, [str(recipe), "--run-dir", run_dir, "--overwrite", "--allow-outside-cwd"])
        assert "is the working directory or holds it" in err
    assert snapshot(tmp_path) == before and sorted(tmp_path.parent.iterdir()) == parent_before


def test_overwrite_refuses_a_folder_that_is_not_a_run_directory(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml", digits_recipe())
    assert apply.main([str(recipe), "--run-dir", "runs/first"]) == 0
    assert apply.main([str(recipe), "--run-dir", "runs/second"]) == 0
    before = snapshot(tmp_path)
    err = one_clean_error(capsys, [str(recipe), "--run-dir", "runs", "--overwrite"])  # the folder of all runs
    assert f"refusing to replace {tmp_path / 'runs'}: it is not a run directory written by recipes.apply" in err
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.csv").write_text("text,label\n")
    err = one_clean_error(capsys, [str(recipe), "--run-dir", "data", "--overwrite"])
    assert "it is not a run directory written by recipes.apply" in err
    assert snapshot(tmp_path) == {**before, "data": None, "data/train.csv": b"text,label\n"}


def test_overwrite_replaces_a_run_directory_only_while_it_holds_nothing_else(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml", digits_recipe())
    assert apply.main([str(recipe), "--run-dir", "runs/r"]) == 0
    marker = json.loads((tmp_path / "runs/r" / RUN_MARKER).read_text())
    assert marker["status"] == "succeeded"
    assert set(marker["files"]) == {p.relative_to(tmp_path / "runs/r").as_posix()
                                    for p in (tmp_path / "runs/r").rglob("*") if p.is_file() and p.name != RUN_MARKER}
    (tmp_path / "runs/r/my-notes.md").write_text("analysis I wrote")
    err = one_clean_error(capsys, [str(recipe), "--run-dir", "runs/r", "--overwrite"])
    assert "it holds files its run did not write (my-notes.md); move them out first" in err
    (tmp_path / "runs/r/my-notes.md").unlink()
    assert apply.main([str(recipe), "--run-dir", "runs/r", "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r"]


def test_overwrite_never_replaces_a_run_directory_that_holds_the_recipes_inputs(workspace, capsys):
    tmp_path, model_dir = workspace
    first = {"name": "first", "model": {"path": str(model_dir)},
             "data": {"max_length": 16, "dev_size": 16, "max_train_samples": 24},
             "pruning": [{"pruning_type": "wanda", "target_sparsity": 0.5, "calibration_samples": 8,
                          "batch_size": 8, "op_names": ["bert.encoder"]}], "evaluation": {"batch_size": 16}}
    assert apply.main([str(write_recipe(tmp_path / "first.yaml", first)), "--run-dir", "runs/chain"]) == 0
    # prune the pruned model again, writing over the run that holds it
    second = {**first, "name": "second", "model": {"path": "runs/chain/model"}}
    before = snapshot(tmp_path / "runs")
    err = one_clean_error(capsys, [str(write_recipe(tmp_path / "second.yaml", second)), "--run-dir", "runs/chain",
                                   "--overwrite"])
    assert "it holds this recipe's input" in err and "runs/chain/model" in err
    assert snapshot(tmp_path / "runs") == before


def test_a_name_too_long_for_the_file_system_is_refused_before_anything_is_written(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml", {**digits_recipe(), "name": "n" * 300})
    err = one_clean_error(capsys, [str(recipe)])
    assert "'name': String should have at most 100 characters" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]  # no empty runs/


def test_stale_staging_directories_are_removed_and_live_ones_kept(tmp_path, capsys):
    runs = tmp_path / "runs"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale, live, foreign = runs / ".r.staging-abc", runs / ".s.staging-def", runs / ".t.staging-ghi"
    for folder in (stale, live, foreign):
        folder.mkdir(parents=True)
        (folder / "report.json").write_text("{}")
    owner = {"host": os.uname().nodename, "process_start": "1"}
    (stale / STAGING_MARKER).write_text(json.dumps({**owner, "pid": int(dead.stdout)}))
    own_start = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
    (live / STAGING_MARKER).write_text(json.dumps({**owner, "pid": os.getpid(), "process_start": own_start}))
    assert remove_stale_staging(runs) == [stale]
    assert live.is_dir() and foreign.is_dir()  # a live owner, and a folder without our marker, are left alone

    (stale).mkdir()
    (stale / STAGING_MARKER).write_text(json.dumps({**owner, "pid": int(dead.stdout)}))
    assert apply.main(["--clean", str(runs)]) == 0
    assert f"removed {stale}" in capsys.readouterr().out and not stale.exists() and live.is_dir()

    (stale).mkdir()
    (stale / STAGING_MARKER).write_text(json.dumps({**owner, "pid": int(dead.stdout)}))
    recipe = write_recipe(tmp_path / "recipe.yaml", digits_recipe())
    assert apply.main([str(recipe), "--run-dir", "runs/new"]) == 0
    assert f"removed {stale}: the staging directory of an earlier run that was killed" in capsys.readouterr().err
    assert sorted(p.name for p in runs.iterdir()) == [".s.staging-def", ".t.staging-ghi", "new"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_terminated_run_leaves_a_failed_directory_with_its_report_and_no_staging(tmp_path, signum):
    recipe = write_recipe(tmp_path / "recipe.yaml", digits_recipe(epochs=400))
    # a test run started in the background (`pytest &` in a script) inherits SIGINT ignored, and Python then leaves
    # it ignored: the run reacts to Ctrl-C as one started in the foreground does only with the default restored
    process = subprocess.Popen([sys.executable, "-m", "recipes.apply", str(recipe), "--run-dir", "runs/r"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list((tmp_path / "runs").glob(".r.staging-*/recipe.yaml")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == (143 if signum == signal.SIGTERM else 130), err
    assert "Traceback" not in err and "interrupted during stage" in err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r.failed"]
    report = json.loads((tmp_path / "runs/r.failed/report.json").read_text())
    assert report["status"] == "interrupted"
    assert json.loads((tmp_path / "runs/r.failed" / RUN_MARKER).read_text())["status"] == "interrupted"


# --- reading the YAML -----------------------------------------------------------------------------------------

ALIAS_BOMB = """name: r
model: {asset: minilm-l6}
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
description: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
pruning: [{pruning_type: wanda, target_sparsity: 0.5, op_names: *h}]
"""


@pytest.mark.parametrize(("text", "expected"), [
    (ALIAS_BOMB, "its aliases expand to more than 100,000 values"),
    ("name: " + "[" * 100_000 + "]" * 100_000, f"nesting deeper than {MAX_DEPTH} levels"),
    ("name: r\nmodel: {asset: minilm-l6}\nname: s\n", "key 'name' appears twice, on lines 1 and 3; keep one"),
    ("name: r\npruning:\n  - pruning_type: wanda\n    target_sparsity: 0.5\n    target_sparsity: 0.7\n",
     "key 'target_sparsity' appears twice, on lines 4 and 5"),
])
def test_hostile_yaml_ends_in_one_line_quickly(tmp_path, capsys, text, expected):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    start = time.perf_counter()
    err = one_clean_error(capsys, [str(path)])
    assert expected in err and len(err) < 1000 and err.count("\n") == 1
    assert time.perf_counter() - start < 10


def test_numbers_and_booleans_are_read_as_yaml_1_2_reads_them_and_merge_keys_still_work():
    assert load_recipe_yaml_text("a: 1e-4\nb: 5E+2\nc: '1e-4'\n") == {"a": 1e-4, "b": 500.0, "c": "1e-4"}
    # YAML 1.1 reads these as 124, 4, 8 and False: a pattern or name without quotes would become a number
    assert load_recipe_yaml_text("p: 2:4\nq: 0x4\nr: 010\ns: no\nt: true\n") == {
        "p": "2:4", "q": "0x4", "r": 10.0, "s": "no", "t": True}
    assert load_recipe_yaml_text("x: &x {a: 1, b: 2}\ny: {<<: *x, a: 3}\n")["y"] == {"a": 3, "b": 2}


def test_a_directory_given_as_the_recipe_says_so(tmp_path, capsys):
    (tmp_path / "recipes.yaml").mkdir()
    assert "is a directory; give a recipe file" in one_clean_error(capsys, [str(tmp_path / "recipes.yaml")])


# --- strict values --------------------------------------------------------------------------------------------


def refused(data) -> str:
    with pytest.raises(RecipeError) as caught:
        parse_recipe(data)
    return str(caught.value)


@pytest.mark.parametrize(("stage", "expected"), [
    ({"target_sparsity": False}, "'pruning.0.target_sparsity': Input should be a valid number (got False)"),
    ({"calibration_samples": True}, "'pruning.0.calibration_samples': Input should be a valid integer (got True)"),
    ({"target_sparsity": "0.5"}, "'pruning.0.target_sparsity': Input should be a valid number (got '0.5')"),
    ({"batch_size": "32"}, "'pruning.0.batch_size': Input should be a valid integer (got '32')"),
    ({"batch_size": 32.0}, "'pruning.0.batch_size': Input should be a valid integer (got 32.0)"),
    ({"target_sparsity": float("nan")}, "'pruning.0.target_sparsity': Input should be a finite number"),
    ({"calibration_samples": 10**12}, "'pruning.0.calibration_samples': Input should be less than or equal to 65536"),
    ({"batch_size": 10**12}, "'pruning.0.batch_size': Input should be less than or equal to 4096"),
    ({"training_steps": 10**12}, "'pruning.0.training_steps': Input should be less than or equal to 10000000"),
    ({"num_particles": 10**12, "pruning_type": "particle_filter"},
     "'pruning.0.num_particles': Input should be less than or equal to 10000"),
    ({"seed": -1}, "'pruning.0.seed': Input should be greater than or equal to 0"),
    ({"seed": 2**64}, "'pruning.0.seed': Input should be less than or equal to 4294967295"),
])
def test_values_must_have_their_type_and_stay_within_bounds(stage, expected):
    assert expected in refused(text_recipe(**stage))


@pytest.mark.parametrize(("change", "expected"), [
    ({"train": {"weight_decay": float("inf")}}, "'train.weight_decay': Input should be a finite number"),
    ({"train": {"epochs": 10**12}}, "'train.epochs': Input should be less than or equal to 1000"),
    ({"train": {"batch_size": True}}, "'train.batch_size': Input should be a valid integer"),
    ({"model": {"architecture": "digits_mlp", "widths": [10**12, 4]}},
     "'model.widths.0': Input should be less than or equal to 4096"),
    ({"model": {"architecture": "digits_mlp", "seed": 2**64}}, "'model.seed': Input should be less than or equal"),
    ({"pruning": [{"pruning_type": "lottery_ticket", "rounds": 10**12}]},
     "'pruning.0.lottery_ticket.rounds': Input should be less than or equal to 100"),
    ({"pruning": [{"pruning_type": "particle_filter", "target_sparsity": 0.5, "num_particles": 10**12}]},
     "'pruning.0.particle_filter.num_particles': Input should be less than or equal to 10000"),
])
def test_digits_recipes_are_as_strict(change, expected):
    assert expected in refused({**digits_recipe(), **change})


def test_corpus_windows_are_bounded():
    data = {"name": "r", "task": "causal_lm", "model": {"asset": "smollm2-135m"},
            "corpus": {"evaluation_windows": 10**12}, "pruning": [{"pruning_type": "wanda", "target_sparsity": 0.5}]}
    assert "'corpus.evaluation_windows': Input should be less than or equal to 10000" in refused(data)


def test_error_messages_show_a_few_hundred_characters_of_a_value(tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", text_recipe(pattern="x" * 5000, op_names=["y" * 3000] * 30))
    err = one_clean_error(capsys, [str(path)])
    assert "characters)" in err and err.count("\n") <= 22  # at most 20 problems, then a count of the rest
    assert all(len(line) < 700 for line in err.splitlines())
