"""ShapesWorld, the demo world, as a plugin: procedural scenes and their task records (`world`), the data
generator behind `data.synthetic` (`data`), task scoring and the benchmark adapter (`scoring`), the training-time
generation hook (`hooks`) and the `make demo` job (`quickstart`). The core knows it only through registries."""

from __future__ import annotations

from vlmkit.shapesworld import data, hooks, scoring  # noqa: F401  (register the generator, hook, benchmark)
