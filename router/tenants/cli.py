"""``routeyard hash-key``: make a new API key and its hash, or hash a key read from stdin.

The key is never taken as an argument, so it does not land in shell history or ``ps``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

from router.tenants.config import MIN_KEY_LENGTH, hash_key, new_key


def hash_key_command(
    argv: Sequence[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None
) -> int:
    """Print a new key and its hash; with ``--stdin``, only the hash of the given key."""
    parser = argparse.ArgumentParser(
        prog="routeyard hash-key",
        description="Print a new random API key and the hash to put in routes.yaml "
        "(auth.keys[].hash). Give the key to its owner; store only the hash.",
    )
    parser.add_argument(
        "--stdin", action="store_true",
        help="read an existing key from standard input and print only its hash",
    )
    args = parser.parse_args(argv)
    stdin = stdin or sys.stdin
    out = stdout or sys.stdout
    if args.stdin:
        key = stdin.read().strip()
        if len(key) < MIN_KEY_LENGTH:
            print(
                f"routeyard hash-key: the key has {len(key)} characters; keys must be at least "
                f"{MIN_KEY_LENGTH} random characters (run without --stdin to make one)",
                file=sys.stderr,
            )
            return 2
        print(hash_key(key), file=out)
        return 0
    key = new_key()
    print(f"key:  {key}", file=out)
    print(f"hash: {hash_key(key)}", file=out)
    return 0
