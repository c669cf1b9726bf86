"""`python -m camcli` runs the same app as the `camcli` console script."""

from camcli.entry import main

main()
