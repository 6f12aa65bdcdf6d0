"""``shiza swarm-key new FILE``: a new private swarm's key (SPEC.md section 18), mode 0600.

Give the same file to every node and client of the swarm (``--swarm-key FILE``); peers
without it cannot connect. The command prints the swarm id that receipts of the swarm carry.
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("swarm-key", help="make the key file of a private swarm")
    cmds = p.add_subparsers(dest="swarm-key_command", required=True)
    new = cmds.add_parser("new", help="write a new random swarm key (refuses to overwrite a file)")
    new.add_argument("file", type=Path, help="where to write it (created with mode 0600)")


def run(args: argparse.Namespace) -> int:
    from node.net.admission import write_swarm_key

    try:
        key = write_swarm_key(args.file)
    except FileExistsError:
        print(f"error: {args.file} exists; refusing to overwrite a swarm key (remove it first, "
              "or choose another file)", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            print(f"error: cannot create {args.file}: its directory does not exist", file=sys.stderr)
            return 2
        raise  # node/cli/errors.py explains it (permission, disk full)
    print(f"wrote {args.file} (mode 600); swarm id {key.swarm_id}")
    print(f"give it to every node and client of the swarm: --swarm-key {args.file}")
    return 0
