from kvpolicy.lab.cli import main

raise SystemExit(main())
