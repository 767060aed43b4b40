"""`python -m weightsync` is the same as the `weightsync` console script."""

from weightsync.cli import main

raise SystemExit(main())
