"""Reads customer records as JSON Lines on stdin and prints each one enriched, one line per record.

Stands in for any command-line tool in a pipeline's `command:` step: pagent feeds it a chunk at a
time and expects exactly one JSON line out per line in.
"""

import json
import sys

REGIONS = {"GB": "EMEA", "FI": "EMEA", "IL": "EMEA", "US": "AMER"}

for line in sys.stdin:
    record = json.loads(line)
    domain = record["email"].rsplit("@", 1)[-1]
    record["email_domain"] = domain
    record["region"] = REGIONS.get(record["country"], "OTHER")
    record["name_length"] = len(record["name"])
    print(json.dumps(record))
