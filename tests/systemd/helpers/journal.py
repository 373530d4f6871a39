#!/usr/bin/python3
"""Finds journal entries by field, for tests/systemd/lib.sh (journal_find, journal_has...).

    journalctl -o json ... | journal.py [--field NAME] [--count] COND...

COND is one of
    KEY=VALUE   the field equals VALUE
    KEY~REGEX   the field matches REGEX (re.search)
    KEY!=VALUE  the field is absent or differs from VALUE
    KEY         the field is present and not empty

Prints every matching entry as one JSON line (or, with --field NAME, that field of each matching
entry, one per line; with --count, only the number of matches). Exits 0 when at least one entry
matched, 1 otherwise. Fields journald stores as byte arrays or repeats are flattened: a byte array
is decoded as UTF-8, a repeated field matches when any of its values does.

Written for /usr/bin/python3 (3.11 on Debian 12); standard library only.
"""

import json
import re
import sys


def values(entry, key):
    v = entry.get(key)
    if v is None:
        return []
    if isinstance(v, list):
        if v and all(isinstance(x, int) for x in v):  # binary field: array of bytes
            return [bytes(v).decode("utf-8", "replace")]
        out = []
        for x in v:  # repeated field
            out.append(bytes(x).decode("utf-8", "replace") if isinstance(x, list) else str(x))
        return out
    return [str(v)]


def parse(cond):
    m = re.fullmatch(r"([A-Za-z0-9_]+)(?:(!=|=|~)(.*))?", cond, re.S)
    if not m:
        sys.exit(f"journal.py: bad condition {cond!r} (KEY=VALUE, KEY~REGEX, KEY!=VALUE or KEY)")
    key, op, arg = m.groups()
    if op is None:
        return key, "present", None
    if op == "~":
        return key, op, re.compile(arg)
    return key, op, arg


def matches(entry, conds):
    for key, op, arg in conds:
        vs = values(entry, key)
        if op == "=" and arg not in vs:
            return False
        if op == "!=" and arg in vs:
            return False
        if op == "~" and not any(arg.search(v) for v in vs):
            return False
        if op == "present" and not any(vs):
            return False
    return True


def main():
    args = sys.argv[1:]
    field = None
    count = False
    while args and args[0].startswith("--"):
        opt = args.pop(0)
        if opt == "--field" and args:
            field = args.pop(0)
        elif opt == "--count":
            count = True
        else:
            sys.exit(f"journal.py: unknown option {opt}")
    conds = [parse(c) for c in args]
    n = 0
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not matches(entry, conds):
            continue
        n += 1
        if count:
            continue
        if field is not None:
            for v in values(entry, field):
                print(v)
        else:
            print(json.dumps(entry, sort_keys=True))
    if count:
        print(n)
    return 0 if n else 1


if __name__ == "__main__":
    sys.exit(main())
