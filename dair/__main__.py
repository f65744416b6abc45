from dair.cli import main

raise SystemExit(main())
