from ezssh.cli import main

raise SystemExit(main())
