"""``python -m drcnn`` (also what ``torchrun -m drcnn`` runs)."""

from drcnn.cli import main

raise SystemExit(main())
