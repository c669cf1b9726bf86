"""`python -m camcli` runs the same app as the `camcli` console script."""

from camcli.cli import main

main()
