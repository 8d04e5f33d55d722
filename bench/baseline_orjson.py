"""Baseline: the same script with orjson."""

import sys

import orjson

source, target = sys.argv[1], sys.argv[2]
with open(source, "rb") as reader, open(target, "wb") as writer:
    for line in reader:
        record = orjson.loads(line)
        writer.write(orjson.dumps({"id": record["id"], "y": 2 * record["x"]}) + b"\n")
