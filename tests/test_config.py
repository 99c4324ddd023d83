"""Config loading: strict keys, nested dataclasses, dotted overrides, YAML round trip."""

from __future__ import annotations

import pytest

from vlmkit.config import ConfigError, ModelConfig, load_config, save_yaml
from vlmkit.registry import Registry


def test_unknown_key_names_key_and_allowed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("bridge:\n  knd: mlp\n")
    with pytest.raises(ConfigError) as err:
        load_config(ModelConfig, path)
    msg = str(err.value)
    assert "bridge.knd" in msg and "kind 'mlp'" in msg and "depth" in msg  # the default kind's own keys


def test_keys_are_checked_per_kind():
    cfg = load_config(ModelConfig, None, ["bridge.kind=qformer", "bridge.num_queries=8", "fusion.mode=xattn"])
    assert cfg.bridge.num_queries == 8 and cfg.fusion.every == 1  # each kind's own settings and defaults
    with pytest.raises(ConfigError, match="'bridge.num_queries' for kind 'mlp'; allowed: .*depth"):
        load_config(ModelConfig, None, ["bridge.num_queries=8"])  # a resampler setting on the mlp bridge
    with pytest.raises(ConfigError, match="'fusion.every' for mode 'prefix'"):
        load_config(ModelConfig, None, ["fusion.every=2"])
    with pytest.raises(ConfigError, match="bridge.kind: unknown bridge 'nope'; known bridges: .*qformer"):
        load_config(ModelConfig, None, ["bridge.kind=nope"])


def test_overrides_and_types(tmp_path):
    cfg = load_config(ModelConfig, None, ["bridge.depth=3", "vision.vit.dim=96", "fusion.mode=xattn"])
    assert cfg.bridge.depth == 3 and isinstance(cfg.bridge.depth, int)
    assert cfg.vision.vit.dim == 96 and cfg.fusion.mode == "xattn"
    with pytest.raises(ConfigError, match="bridge.depth"):
        load_config(ModelConfig, None, ["bridge.depth=deep"])
    with pytest.raises(ConfigError, match="vision.vit.nope"):
        load_config(ModelConfig, None, ["vision.vit.nope=1"])


def test_nested_list_of_towers_and_yaml_round_trip(tmp_path):
    cfg = load_config(
        ModelConfig, None, ["vision.kind=fused", "vision.towers=[{kind: vit, image_size: 32}, {kind: vit}]"]
    )
    assert cfg.vision.towers[0].image_size == 32 and cfg.vision.towers[1].vit.dim == 128
    save_yaml(cfg, tmp_path / "out.yaml")
    assert load_config(ModelConfig, tmp_path / "out.yaml") == cfg


def test_registry_lists_known_ids():
    reg: Registry = Registry("widget")
    reg.register("a")(int)
    reg.register("b")(str)
    with pytest.raises(KeyError, match="known widgets: a, b"):
        reg.get("c")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(float)


def test_recipes_resolve_by_name_and_unknown_names_list_the_known():
    from vlmkit.config import RecipeConfig, resolve_recipe

    assert resolve_recipe("tiny").name == "tiny.yaml"
    assert load_config(RecipeConfig, "tiny").model.llm.kind == "tiny"
    with pytest.raises(ConfigError, match="known recipes: .*tiny"):
        resolve_recipe("no-such-recipe")


def test_mapping_values_are_typed_too():
    from vlmkit.config import RecipeConfig

    cfg = load_config(RecipeConfig, "tiny", ["stages.1.module_lr.bridge=2e-3", "stages.0.lr=1e-2"])
    assert cfg.stages[1].module_lr == {"bridge": 0.002} and isinstance(
        cfg.stages[1].module_lr["bridge"], float
    )
    assert cfg.stages[0].lr == 0.01
    with pytest.raises(ConfigError, match="module_lr.bridge"):
        load_config(RecipeConfig, "tiny", ["stages.1.module_lr.bridge=fast"])


def test_xattn_with_anyres_is_refused_at_load():
    from vlmkit.config import RecipeConfig

    for resize in ("model.processor.resize=anyres", "data.resize=anyres"):  # data.resize: the legacy key
        with pytest.raises(ConfigError) as err:
            load_config(RecipeConfig, "tiny", ["model.fusion.mode=xattn", resize])
        msg = str(err.value)
        assert "fusion.mode" in msg and "xattn" in msg and "processor.resize" in msg and "anyres" in msg
    assert load_config(RecipeConfig, "tiny", ["model.fusion.mode=xattn", "model.processor.resize=pad"])
    assert load_config(RecipeConfig, "tiny", ["model.processor.resize=anyres"])  # with prefix fusion
    assert load_config(RecipeConfig, "tiny", ["model.fusion.mode=xattn", "data.packing=true"])  # isolated


def test_lora_quantize_values_are_checked_at_load():
    from vlmkit.config import LoRAConfig, RecipeConfig

    with pytest.raises(ConfigError) as err:
        load_config(RecipeConfig, "tiny", ["stages.1.lora.quantize=banana"])
    msg = str(err.value)
    assert "stages[1].lora.quantize" in msg and "banana" in msg and "none, 4bit" in msg
    assert (
        load_config(RecipeConfig, "tiny", ["stages.1.lora.quantize=4bit"]).stages[1].lora.quantize == "4bit"
    )
    with pytest.raises(ConfigError, match="quantize"):
        LoRAConfig(quantize="8bit")  # built in code, too


def test_save_yaml_replaces_the_file_whole_or_not_at_all(tmp_path, monkeypatch):
    """config.yaml / pretrain_config.yaml (a finished pretraining's marker) are never left half-written: a
    failure while writing keeps the previous file and leaves no temporary file behind."""
    import yaml

    from vlmkit.confio import save_yaml

    path = tmp_path / "config.yaml"
    save_yaml({"a": 1}, path)

    def broken_dump(data, stream, **kwargs):
        stream.write("a: ")
        raise OSError("disk full")

    monkeypatch.setattr(yaml, "safe_dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        save_yaml({"a": 2}, path)
    assert yaml.safe_load(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
