"""``python -m normswap.native [--verbose]``: build normswap's native kernels (or find them built) and say where."""

from __future__ import annotations

import sys

from normswap.native import NativeBuildError, build


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a not in ("--verbose", "-v") for a in args):
        print("usage: python -m normswap.native [--verbose]", file=sys.stderr)
        return 2
    try:
        lib = build(verbose=bool(args))
    except NativeBuildError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    import torch

    lanes = torch.ops.normswap_native.float_lanes()
    print(f"normswap native kernels: {lib} (ABI {torch.ops.normswap_native.abi()}, {lanes} float lanes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
