"""``python -m questsig.hub.push genkey [FILE]``: make a VAPID key pair for push-vapid-key."""
from __future__ import annotations

import sys
from typing import Sequence

from questsig.hub.push.crypto import generate_key


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "genkey" or len(args) > 2:
        print("usage: python -m questsig.hub.push genkey [FILE]   (default FILE: vapid-private.pem)",
              file=sys.stderr)
        return 2
    path = args[1] if len(args) == 2 else "vapid-private.pem"
    try:
        public = generate_key(path)
    except FileExistsError:
        print(f"{path} exists; not overwriting it", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"cannot write {path}: {e.strerror}", file=sys.stderr)
        return 1
    print(f"private key written to {path} (use it as push-vapid-key)")
    print(f"public key (applicationServerKey): {public}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
