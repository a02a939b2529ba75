"""``python -m training [train] ...`` trains an adapter; ``python -m training eval ...`` evaluates one."""

import sys

from training import cli, eval_cli

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["eval"]:
        sys.exit(eval_cli.main(args[1:]))
    sys.exit(cli.main(args[1:] if args[:1] == ["train"] else args))
