"""Allow ``python -m appliance`` as an alias of the ``clinic-edge`` console script."""

from appliance.cli import main

raise SystemExit(main())
