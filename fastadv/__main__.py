from fastadv.cli import main

raise SystemExit(main())
