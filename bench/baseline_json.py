"""Baseline: a plain one-process script reading, transforming and writing JSON Lines with `json`."""

import json
import sys

source, target = sys.argv[1], sys.argv[2]
with open(source) as reader, open(target, "w") as writer:
    for line in reader:
        record = json.loads(line)
        writer.write(json.dumps({"id": record["id"], "y": 2 * record["x"]}) + "\n")
