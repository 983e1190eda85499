"""``fastadv info``: versions, what the kernels were built for, and which devices run them."""

from __future__ import annotations

import json


def add_parser(sub):
    p = sub.add_parser("info", help="print versions, the compiled CUDA version and architectures, native devices",
                       description=__doc__)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run)


def run(args) -> int:
    from fastadv import info

    data = info.collect()
    print(json.dumps(data, indent=2) if args.json else info.format_info(data))
    return 0
