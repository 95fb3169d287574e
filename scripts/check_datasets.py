"""Check that every dataset a protocol needs is present under DATA_ROOT, before a long sweep starts.

Usage: ``python scripts/check_datasets.py [--data-root DIR] PROTOCOL [PROTOCOL ...]`` (protocol names
of ``feclip/conf/protocol/``). Prints one line per dataset; for each missing or broken one, the command that
gets it and the one that checks it. Exit status 1 when anything is missing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

CONF = Path(__file__).resolve().parent.parent / "feclip" / "conf"


def protocol_datasets(name: str) -> list[dict]:
    path = CONF / "protocol" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONF / "protocol").glob("*.yaml"))
        raise SystemExit(f"check_datasets: unknown protocol {name!r}; known: {', '.join(known)}")
    data = yaml.safe_load(path.read_text())
    return [data["train"], *data["targets"]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("protocols", nargs="+")
    parser.add_argument("--data-root", default=os.environ.get("DATA_ROOT", "data"))
    args = parser.parse_args(argv)
    from feclip.data import DEFAULT_DIRS, list_samples
    from feclip.errors import FEClipError

    seen, missing = set(), []
    for proto in args.protocols:
        for ref in protocol_datasets(proto):
            name, folder = ref["name"], ref.get("dir") or DEFAULT_DIRS[ref["name"]]
            if (name, folder) in seen:
                continue
            seen.add((name, folder))
            root = Path(args.data_root) / folder
            try:
                n = len(list_samples(name, root, split=ref.get("split", "test")))
                print(f"  ok       {name:<14} {root} ({n} images)")
            except FEClipError as e:
                missing.append((name, root))
                print(f"  MISSING  {name:<14} {root}: {str(e).splitlines()[0]}")
    if missing:
        print(f"\n{len(missing)} dataset(s) missing or broken. Get and check them with:")
        for name, root in missing:
            print(f"  feclip-data download {name} --root {args.data_root}   # or the manual steps it prints")
            print(f"  feclip-data check {root} --dataset {name}")
        return 1
    print("every dataset is present")
    return 0


if __name__ == "__main__":
    sys.exit(main())
