#!/usr/bin/env python3
"""Read every Avro file under an output folder with fastavro and print it as JSON.

Usage: read_avro.py OUTPUT_DIR

Prints one JSON array: for each file, its key (path relative to OUTPUT_DIR), codec, embedded
writer schema and records. Times (timestamp-millis) are printed as milliseconds since the Unix
epoch, so the output compares directly with what the apache-avro crate reads.
"""

import datetime
import json
import pathlib
import sys

import fastavro


def to_json(value):
    if isinstance(value, datetime.datetime):
        return round(value.timestamp() * 1000)
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [to_json(item) for item in value]
    return value


def read_file(path, root):
    with open(path, "rb") as file:
        reader = fastavro.reader(file)
        records = [to_json(record) for record in reader]
        return {
            "key": path.relative_to(root).as_posix(),
            "codec": reader.codec,
            "schema": json.loads(reader.metadata["avro.schema"]),
            "records": records,
        }


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: read_avro.py OUTPUT_DIR")
    root = pathlib.Path(sys.argv[1])
    files = sorted(root.glob("incoming-logs/**/*.avro"))
    json.dump([read_file(path, root) for path in files], sys.stdout)


if __name__ == "__main__":
    main()
