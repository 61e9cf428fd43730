from kvpolicy.cli import main

raise SystemExit(main())
