from scoreq_live.cli import main

raise SystemExit(main())
