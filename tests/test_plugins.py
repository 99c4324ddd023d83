"""Plugins register their parts when a registry is first asked for a name it does not know: a recipe can name
ShapesWorld's generator, hook or benchmark without importing the plugin."""

from __future__ import annotations

import subprocess
import sys


def test_plugin_parts_resolve_without_importing_the_plugin():
    code = (
        "import sys\n"
        "from vlmkit.config import RecipeConfig, from_dict\n"
        "from vlmkit.eval.benchmarks import BENCHMARKS\n"
        "from vlmkit.train.hooks import GENERATION_HOOKS\n"
        "assert 'vlmkit.shapesworld' not in sys.modules\n"
        "recipe = from_dict(RecipeConfig, {'data': {'synthetic': {'n_train': 3}}})\n"
        "assert type(recipe.data.synthetic).__name__ == 'ShapesWorldConfig', recipe.data.synthetic\n"
        "assert recipe.data.synthetic.n_train == 3 and recipe.model.processor.grounding_format == 'qwen'\n"
        "assert BENCHMARKS.get('shapesworld').__module__ == 'vlmkit.shapesworld.scoring'\n"
        "assert GENERATION_HOOKS.get('shapesworld').__name__ == 'TaskGenerationHook'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_part_still_lists_the_known_ones():
    from vlmkit.data.generators import DATA_GENERATORS

    try:
        DATA_GENERATORS.get("nope")
    except KeyError as err:
        assert "known data generators: shapesworld" in str(err)
    else:
        raise AssertionError("an unknown generator was found")
