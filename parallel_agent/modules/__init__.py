"""Built-in data modules behind `use:` in a pipeline: split, map, filter and aggregate."""

BUILTIN_MODULES = ("aggregate", "filter", "map", "split")

__all__ = ["BUILTIN_MODULES"]
