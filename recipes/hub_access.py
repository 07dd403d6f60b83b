"""Fails fast, with a message a person can act on, when a recipe needs the Hugging Face hub and cannot have it.

Checked before any model is loaded: the offline switches (HF_HUB_OFFLINE and its relatives), the optional
`datasets` package, and a TCP connection to the hub endpoint with a short timeout (so no 60-second retries).
"""

import os
import socket
import threading
import urllib.parse

from .schema import RECIPES_DIR, Recipe, RecipeError, load_recipe

OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_SECONDS = 3.0


def hub_needs(recipe: Recipe) -> list[str]:
    """What the recipe would fetch from the hub, in words; empty for an offline recipe."""
    # read defensively: recipe kinds with other model and data sections (e.g. the digits recipes) have no hub keys
    model_hub = getattr(getattr(recipe, "model", None), "hub_id", None)
    data_hub = getattr(getattr(recipe, "data", None), "hub", None)
    needs = [f"model {model_hub!r}"] if model_hub is not None else []
    if data_hub is not None:
        needs.append(f"dataset {data_hub.name!r}" + (f" ({data_hub.config})" if data_hub.config else ""))
    return needs


def import_datasets():
    try:
        import datasets
    except ImportError:
        raise RecipeError("hub datasets need the optional `datasets` package: pip install 'inc-plugins[hub]'") from None
    return datasets


def unreachable_reason(timeout: float = PROBE_SECONDS) -> str | None:
    """Why the hub cannot be used from here, or None when a connection to its endpoint opens within `timeout`."""
    switched = [name for name in OFFLINE_SWITCHES if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")]
    if switched:
        return f"{', '.join(switched)} is set"
    endpoint = os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT)
    parsed = urllib.parse.urlparse(endpoint)
    host, port = parsed.hostname, parsed.port or (80 if parsed.scheme == "http" else 443)
    outcome: list[str | None] = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(None)
        except OSError as err:
            outcome.append(f"{endpoint} cannot be reached ({err.strerror or type(err).__name__})")

    # name resolution ignores socket timeouts, so the whole probe runs in a thread we stop waiting for
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout * 2)
    return outcome[0] if outcome else f"{endpoint} did not answer within {timeout * 2:.0f} s"


def offline_recipes() -> list[str]:
    """Shipped recipes that need nothing from the hub."""
    names = []
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        try:
            if not hub_needs(load_recipe(path)):
                names.append(path.name)
        except RecipeError:
            continue
    return names


def require_hub_if_needed(recipe: Recipe) -> None:
    """Raises RecipeError at once when the recipe needs the hub and cannot have it."""
    needs = hub_needs(recipe)
    if not needs:
        return
    problems = []
    if getattr(getattr(recipe, "data", None), "hub", None) is not None:
        try:
            import_datasets()
        except RecipeError as err:
            problems.append(str(err))
    reason = unreachable_reason()
    if reason is not None:
        problems.append(f"the hub is not available: {reason}")
    if problems:
        raise RecipeError(
            f"recipe {recipe.name!r} needs the Hugging Face hub for {' and '.join(needs)}, but "
            + "; ".join(problems)
            + f".\nOffline recipes that run here: {', '.join(offline_recipes())}"
        )
