"""The benchmark transform as a command: JSON Lines in, JSON Lines out."""

import json
import sys

out = sys.stdout
for line in sys.stdin:
    record = json.loads(line)
    out.write(json.dumps({"id": record["id"], "y": 2 * record["x"]}) + "\n")
