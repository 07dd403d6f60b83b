"""Recipes never run code they were not asked to: no remote code unless the recipe opts in, and checkpoints read
as safetensors or with torch.load(weights_only=True)."""

import json
import re
from pathlib import Path

from recipes.model_sources import load_classifier
from recipes.schema import ModelSource

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("inc_plugins", "recipes", "benchmarks")


def test_code_shipped_with_a_model_does_not_run_unless_the_recipe_trusts_it(workspace):
    tmp_path, model_dir = workspace
    sentinel = tmp_path / "remote-code-ran"
    (model_dir / "evil_model.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "evil_model.EvilModel",
                          "AutoConfig": "evil_model.EvilConfig"}
    (model_dir / "config.json").write_text(json.dumps(config))

    model, _ = load_classifier(ModelSource(path=model_dir))
    assert type(model).__name__ == "BertForSequenceClassification"
    assert not sentinel.exists()


def test_every_torch_load_in_the_project_is_weights_only():
    calls = []
    for directory in SOURCE_DIRS:
        for path in (REPO / directory).rglob("*.py"):
            for match in re.finditer(r"torch\.load\((?:[^()]|\([^()]*\))*\)", path.read_text()):
                calls.append((path.relative_to(REPO), match.group(0)))
    unsafe = [(str(path), call) for path, call in calls if "weights_only=True" not in call]
    assert not unsafe, f"torch.load without weights_only=True (a pickle can run code): {unsafe}"

