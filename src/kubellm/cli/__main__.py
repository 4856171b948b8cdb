"""``python -m kubellm.cli`` — the same as the ``kubellm`` console script."""

from kubellm.cli.app import main

main()
