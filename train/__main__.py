"""``python -m train TASK [options]``: the same as ``jaxloss-train``."""

import sys

from train.huge_pages import restart_with_huge_pages


def main() -> int:
    """``jaxloss-train``: restarts once with huge pages for the host allocator where that helps
    (:mod:`train.huge_pages`), before anything heavy is imported, then runs :func:`train.cli.main`."""
    restart_with_huge_pages()
    from train.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
