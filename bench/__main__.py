"""``python -m ditkernels.bench`` (same as ``python -m ditkernels bench``)."""

from .runner import main

raise SystemExit(main())
