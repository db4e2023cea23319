"""``python -m jadam.bench``: see :mod:`jadam.bench`."""

from jadam.bench import main

raise SystemExit(main())
