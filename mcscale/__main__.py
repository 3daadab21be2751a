from mcscale.cli import main

raise SystemExit(main())
