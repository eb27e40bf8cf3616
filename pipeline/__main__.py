"""``python -m pipeline`` is the ``mmpipe`` command."""

from pipeline.tooling.cli import main

raise SystemExit(main())
