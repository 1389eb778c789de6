"""``python -m moeprune`` (and ``torchrun -m moeprune``) run the console script."""

from moeprune.cli import main

raise SystemExit(main())
