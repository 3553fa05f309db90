"""``clinic-edge keys``: add, list and revoke the workstation keys the gateway accepts."""

from __future__ import annotations

import argparse
from pathlib import Path

from appliance.cli import EXIT_NEGATIVE, Outcome
from appliance.keys import add_key, list_keys, revoke_key

__all__ = ["DEFAULT_KEYS_FILE", "register"]

DEFAULT_KEYS_FILE = Path("/etc/clinic-edge/keys.json")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add ``keys add``, ``keys list`` and ``keys revoke``."""
    parser = subparsers.add_parser(
        "keys",
        help="add, list or revoke workstation API keys",
        description="Workstation keys let dental workstations call the gateway. Only SHA-256 hashes are stored "
        "(file mode 0600); a key is shown once, when it is made. The gateway notices changes to the file on the "
        "next request: no restart needed.",
    )
    verbs = parser.add_subparsers(title="verbs", metavar="VERB", required=True)
    file_parent = argparse.ArgumentParser(add_help=False)
    file_parent.add_argument(
        "--keys-file", type=Path, default=DEFAULT_KEYS_FILE, help=f"the keys file (default {DEFAULT_KEYS_FILE})"
    )
    add = verbs.add_parser(
        "add",
        parents=[common, file_parent],
        help="make a key for a workstation and print it once",
        description="Make a new key named NAME and print it once, as the last line of output (store it in the "
        "workstation's configuration right away; it cannot be shown again).",
        epilog="example: clinic-edge keys add reception-1 --keys-file /etc/clinic-edge/keys.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add.add_argument("name", help="a name for the workstation (letters, digits, . _ -), e.g. surgery-2")
    add.set_defaults(func=_add)
    lst = verbs.add_parser(
        "list",
        parents=[common, file_parent],
        help="list key names and when they were made",
        description="List the keys by name and creation time (keys themselves are never stored).",
        epilog="example: clinic-edge keys list --json",
    )
    lst.set_defaults(func=_list)
    revoke = verbs.add_parser(
        "revoke",
        parents=[common, file_parent],
        help="revoke a workstation's key (takes effect on its next request)",
        description="Remove the key named NAME. The gateway refuses it from the next request on. Exit 1 when "
        "there is no such key.",
        epilog="example: clinic-edge keys revoke reception-1",
    )
    revoke.add_argument("name", help="the key's name (see 'keys list')")
    revoke.set_defaults(func=_revoke)


def _add(args: argparse.Namespace) -> Outcome:
    key = add_key(args.keys_file, args.name)
    return Outcome(
        data={"name": args.name, "key": key, "keys_file": str(args.keys_file)},
        text=f"Added key '{args.name}' to {args.keys_file}. It is shown only now; put it in the workstation's "
        f"settings:\n{key}",
    )


def _list(args: argparse.Namespace) -> Outcome:
    records = list_keys(args.keys_file)
    rows = [{"name": r.name, "created_at": r.created_at} for r in records]
    if not rows:
        text = f"No keys in {args.keys_file}. Add one: clinic-edge keys add NAME --keys-file {args.keys_file}"
    else:
        width = max(len(r["name"]) for r in rows)
        text = "\n".join(f"{r['name']:<{width}}  {r['created_at']}" for r in rows)
    return Outcome(data={"keys_file": str(args.keys_file), "keys": rows}, text=text)


def _revoke(args: argparse.Namespace) -> Outcome:
    if revoke_key(args.keys_file, args.name):
        return Outcome(
            data={"name": args.name, "revoked": True},
            text=f"Revoked '{args.name}'; the gateway refuses it from its next request.",
        )
    return Outcome(
        data={"name": args.name, "revoked": False},
        text=f"No key named '{args.name}' in {args.keys_file} (see 'clinic-edge keys list').",
        exit_code=EXIT_NEGATIVE,
    )
