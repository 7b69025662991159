"""``calstream asn make``: write a jwst level-3 association from a list of files."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from calstream.steps.asn import asn_from_list, write_association

from .cli import EXIT_INPUT, EXIT_OK, EXIT_USAGE


def add_asn_parser(sub: argparse._SubParsersAction) -> None:
    """The ``asn`` command and its ``make`` sub-command (as jwst's ``asn_from_list``)."""
    asn = sub.add_parser("asn", help="association files (jwst *_asn.json)")
    asn_sub = asn.add_subparsers(dest="asn_command", required=True)
    make = asn_sub.add_parser("make", help="an association from a list of files (as jwst's asn_from_list)",
                              description="Member names are written relative to the association "
                                          "file's folder, so the association can be moved with its files.")
    make.add_argument("-o", "--output-file", required=True, help="the association to write (X_asn.json)")
    make.add_argument("--product-name", required=True, help="the level-3 product name (output file stem)")
    make.add_argument("--asn-type", default="image3")
    make.add_argument("--asn-rule", default="DMS_Level3_Base")
    make.add_argument("-i", "--id", dest="asn_id", default=None, help="association id (default a3001)")
    make.add_argument("files", nargs="+", help="member files (science exposures, e.g. *_cal.fits)")
    make.set_defaults(handler=cmd_asn_make)


def cmd_asn_make(args: argparse.Namespace, extra: list[str]) -> int:
    """Write the association; exit 2 for bad usage, 3 for a missing member file."""
    if extra:
        print(f"calstream: error: unknown arguments: {extra}", file=sys.stderr)
        return EXIT_USAGE
    output = Path(args.output_file)
    missing = [f for f in args.files if not Path(f).is_file()]
    if missing:
        print(f"calstream: error: bad input: member files do not exist: {missing}", file=sys.stderr)
        return EXIT_INPUT
    folder = output.resolve().parent
    members = [os.path.relpath(Path(f).resolve(), folder) for f in args.files]
    asn = asn_from_list(members, args.product_name, asn_type=args.asn_type, asn_rule=args.asn_rule,
                        asn_id=args.asn_id)
    write_association(asn, output)
    print(f"asn       {output} ({len(members)} members, product {args.product_name})")
    return EXIT_OK
